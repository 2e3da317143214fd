"""ControlNet units as a request names them (sd-webui-controlnet's `ControlNetUnit` fields), and
how they become `apply.ControlUnit`s: the model (a ControlNet or a T2I-Adapter) found and loaded
once, the control image run through its preprocessor and brought to the generation size. Also
the unit's infotext line, as the extension writes and reads it (`infotext_line`, `parse_infotext_line`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlab.controlnet.apply import (CONTROL_ALIASES, CONTROL_MODES, HR_OPTIONS, RESIZE_ALIASES, RESIZE_MODES,
                                   ControlUnit, hint_tensor, resize_hint)
from sdlab.controlnet.loading import load_controlnet
from sdlab.errors import SdlabError
from sdlab.models.controlnet import ControlNet
from sdlab.models.t2i_adapter import T2IAdapter

__all__ = ["CONTROLNET_FOLDERS", "INFOTEXT_FIELDS", "ControlNets", "ControlRequest", "control_mode_name",
           "controlnet_names", "detected_map", "find_controlnet", "infotext_line", "infotext_units",
           "parse_infotext_line", "pixel_perfect_resolution", "resize_mode_name"]

# The web UI's folder and ComfyUI's, under the models root.
CONTROLNET_FOLDERS = ("ControlNet", "controlnet")
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class ControlRequest:
    """One ControlNet unit of a request, with the extension's names and defaults."""

    model: str  # a file or diffusers folder, or a name in models/ControlNet (or ComfyUI's models/controlnet)
    image: Image.Image | None = None  # None: the init image (img2img), as the extension does
    module: str = "none"  # the preprocessor ("canny", ...; `preprocess.PREPROCESSORS`)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    processor_res: float = -1  # -1: the preprocessor's default
    threshold_a: float = -1
    threshold_b: float = -1
    pixel_perfect: bool = False
    mask: Image.Image | None = None  # for the inpaint preprocessors
    hr_option: str = "Both"  # with the hires fix: "Both" passes, "Low res only" or "High res only"


def controlnet_names(root: Path) -> dict[str, Path]:
    """Name (file stem, or folder name of a diffusers folder) -> path, from both folders."""
    found: dict[str, Path] = {}
    for folder in CONTROLNET_FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix.lower() in SUFFIXES and "annotators" not in path.parts:
                found.setdefault(path.stem, path)
            elif path.is_dir() and (path / "config.json").is_file():
                found.setdefault(path.name, path)
    return found


# Short names the CLI takes (any unambiguous start of a name works too).
_CONTROL_SHORT = {"balanced": "Balanced", "prompt": "My prompt is more important",
                  "controlnet": "ControlNet is more important"}
_RESIZE_SHORT = {"just": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


def _mode_name(value: object, modes: tuple[str, ...], aliases: dict[str, str], short: dict[str, str],
               what: str) -> str:
    text = str(value).strip()
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))
    found = aliases.get(text, text)
    if found in modes:
        return found
    lower = text.lower()
    found = next((m for m in modes if m.lower() == lower), None) or short.get(lower)
    if found is None:
        starts = {m for m in modes if m.lower().startswith(lower)} if lower else set()
        found = starts.pop() if len(starts) == 1 else None
    if found is None:
        raise SdlabError(f"unknown {what} {value!r}; choose one of: {', '.join(modes)} (or 0-{len(modes) - 1}, "
                         f"or {', '.join(short)})")
    return found


def control_mode_name(value: object) -> str:
    """The extension's control mode of a name, its API integer, or a short name ("balanced",
    "prompt", "controlnet"), case-insensitively."""
    return _mode_name(value, CONTROL_MODES, CONTROL_ALIASES, _CONTROL_SHORT, "control mode")


def resize_mode_name(value: object) -> str:
    """The extension's resize mode of a name (its old names too), its API integer, or a short name
    ("just", "crop", "fill"), case-insensitively."""
    return _mode_name(value, RESIZE_MODES, RESIZE_ALIASES, _RESIZE_SHORT, "resize mode")


def detected_map(unit: ControlUnit) -> Image.Image:
    """The hint a unit guides with, as the image the extension appends to the API's images (its
    detected map at the generation size); an inpaint hint's masked pixels (-1) show black."""
    hint = unit.hint[0, :3].clamp(0, 1).mul(255).round().to(dtype=torch.uint8)  # hints are uint8 / 255
    return Image.fromarray(hint.permute(1, 2, 0).cpu().numpy())


def find_controlnet(names: dict[str, Path], name: str) -> str | None:
    """The name in `names` that a request's model name means, by the extension's rules
    (`find_closest_lora_model_name`): the exact name (a "name [hash]" title's name), then the
    same name in other case, then the shortest name that contains it; None if none does."""
    stem = name.strip()
    stem = stem.rsplit(" [", 1)[0] if stem.endswith("]") else stem  # the extension's "name [hash]"
    if stem in names:
        return stem
    lower = stem.lower()
    same = [n for n in names if n.lower() == lower]
    if same:
        return same[0]
    containing = sorted((n for n in names if lower and lower in n.lower()), key=len)
    return containing[0] if containing else None


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution that makes the detected map exactly as fine as the generation
    (the extension's `pixel_perfect_resolution`)."""
    w, h = image.size
    mode = RESIZE_ALIASES.get(str(resize_mode), resize_mode)
    k = (min if mode == "Resize and Fill" else max)(height / h, width / w)
    return int(round(k * min(h, w)))


class ControlNets:
    """The ControlNets loaded for one model, kept between requests (loading one costs seconds)."""

    def __init__(self, models_root: Path):
        self.root = Path(models_root)
        self._loaded: dict[Path, ControlNet] = {}

    def path(self, name: str) -> Path:
        given = Path(name).expanduser()
        if given.exists():
            return given
        names = controlnet_names(self.root)
        found = find_controlnet(names, name)
        if found is not None:
            return names[found]
        known = ", ".join(sorted(names)) or "none"
        raise SdlabError(f"ControlNet model {name!r} not found in {self.root / CONTROLNET_FOLDERS[0]} or "
                         f"{self.root / CONTROLNET_FOLDERS[1]} (found: {known})")

    def get(self, name: str, bundle) -> ControlNet | T2IAdapter:
        path = self.path(name)
        net = self._loaded.get(path)
        if net is None:
            # Refuses a ControlNet (or T2I-Adapter) made for another family, in one line.
            net = load_controlnet(path, unet=bundle.unet, dtype=bundle.dtype, device=bundle.device,
                                  latent_factor=bundle.config.vae.downsample_factor)
            self._loaded[path] = net
        return net

    def units(self, requests: Sequence[ControlRequest | ControlUnit], bundle, width: int, height: int,
              init_image: Image.Image | None, hires: bool = False) -> list[ControlUnit]:
        """The request's units made concrete; SdlabError (one line) for a missing image, an unknown
        module, model, mode or a ControlNet of another family. `hires`: the request runs the hires
        fix, where a unit's `hr_option` counts (elsewhere every unit guides, as in the extension)."""
        from sdlab.controlnet.preprocess import get_preprocessor

        out, used = [], set()
        for i, unit in enumerate(requests):
            if isinstance(unit, ControlUnit):
                out.append(unit)
                continue
            image = unit.image if unit.image is not None else init_image
            if image is None:
                raise SdlabError(f"ControlNet unit {i}: no control image (give one, or an init image for img2img)")
            if unit.hr_option not in HR_OPTIONS:
                raise SdlabError(f"ControlNet unit {i}: hr_option {unit.hr_option!r} is not one of "
                                 f"{', '.join(HR_OPTIONS)}")
            preprocessor = get_preprocessor(unit.module)
            resize, mode = resize_mode_name(unit.resize_mode), control_mode_name(unit.control_mode)
            resolution = unit.processor_res
            if unit.pixel_perfect:
                resolution = pixel_perfect_resolution(image, width, height, resize)
            detected = np.asarray(preprocessor(image.convert("RGB"), resolution, unit.threshold_a, unit.threshold_b,
                                               unit.mask))
            hint = hint_tensor(resize_hint(detected, width, height, resize))
            used.add(self.path(unit.model))
            out.append(ControlUnit(self.get(unit.model, bundle), hint, unit.weight, unit.guidance_start,
                                   unit.guidance_end, mode, module=preprocessor.name, detected=detected,
                                   resize_mode=resize, hr_option=unit.hr_option if hires else "Both"))
        # Keep only what this request used: ControlNets are UNet-sized.
        self._loaded = {p: net for p, net in self._loaded.items() if p in used}
        return out


# The extension's infotext fields (internal_controlnet/args.py `ControlNetUnit.infotext_fields`),
# as it writes them: "Module: canny, Model: name [hash], Weight: 1.0, ...", in this order.
INFOTEXT_FIELDS = {"Module": "module", "Model": "model", "Weight": "weight", "Resize Mode": "resize_mode",
                   "Processor Res": "processor_res", "Threshold A": "threshold_a", "Threshold B": "threshold_b",
                   "Guidance Start": "guidance_start", "Guidance End": "guidance_end",
                   "Pixel Perfect": "pixel_perfect", "Control Mode": "control_mode"}


def infotext_line(unit: ControlRequest) -> str:
    """A unit's infotext value, as the extension's `ControlNetUnit.serialize` writes it: each
    field as the type its unit holds (weights and thresholds float, the resolution int)."""
    model = Path(unit.model)  # a file's or folder's name, or the API's "name [hash]"
    values = {"module": unit.module, "model": model.stem if model.suffix.lower() in SUFFIXES else model.name,
              "weight": float(unit.weight), "resize_mode": resize_mode_name(unit.resize_mode),
              "processor_res": int(unit.processor_res), "threshold_a": float(unit.threshold_a),
              "threshold_b": float(unit.threshold_b), "guidance_start": float(unit.guidance_start),
              "guidance_end": float(unit.guidance_end), "pixel_perfect": bool(unit.pixel_perfect),
              "control_mode": control_mode_name(unit.control_mode)}
    return ", ".join(f"{key}: {values[name]}" for key, name in INFOTEXT_FIELDS.items())


def parse_infotext_line(text: str, key: str = "ControlNet") -> dict:
    """`ControlRequest` fields (no image) of an infotext value the extension wrote, parsed as its
    `ControlNetUnit.parse` does (items split at ", ", each at ": "; True / False, numbers).

    Raises:
        SdlabError: a field sdlab does not know, or a value of the wrong kind; the message names `key`.
    """
    fields: dict = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition(": ")
        if not sep or name not in INFOTEXT_FIELDS:
            raise SdlabError(f"the infotext's {key} has {item.strip()!r}; sdlab reads "
                             f"{', '.join(INFOTEXT_FIELDS)} (remove the line to replay without it)")
        field = INFOTEXT_FIELDS[name]
        if field == "pixel_perfect":
            if value not in ("True", "False"):
                raise SdlabError(f"the infotext's {key} has Pixel Perfect: {value!r}; expected True or False")
            fields[field] = value == "True"
        elif field in ("module", "model", "resize_mode", "control_mode"):
            fields[field] = value
        else:
            try:
                fields[field] = float(value)
            except ValueError:
                raise SdlabError(f"the infotext's {key} has {name}: {value!r}, which is not a number") from None
    if "model" not in fields:
        raise SdlabError(f"the infotext's {key} names no Model")
    return fields


def infotext_units(params: dict[str, str]) -> list[dict]:
    """The units of a parsed infotext's `ControlNet N` lines, in N's order (`parse_infotext_line`).
    N counts the enabled units: the extension numbers the list of enabled units it writes
    (scripts/controlnet.py `get_enabled_units` -> `Infotext.write_infotext`)."""
    lines = []
    for key, value in params.items():
        head, _, number = key.partition(" ")
        if head == "ControlNet" and number.isdigit():
            lines.append((int(number), key, value))
    return [parse_infotext_line(value, key) for _, key, value in sorted(lines)]
