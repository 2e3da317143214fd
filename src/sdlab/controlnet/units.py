"""ControlNet units as a request names them (sd-webui-controlnet's `ControlNetUnit` fields), and
how they become `apply.ControlUnit`s: the model found and loaded once, the control image run
through its preprocessor and brought to the generation size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdlab.controlnet.apply import CONTROL_ALIASES, RESIZE_ALIASES, ControlUnit, hint_tensor, resize_hint
from sdlab.controlnet.loading import load_controlnet
from sdlab.errors import SdlabError
from sdlab.models.controlnet import ControlNet

__all__ = ["CONTROLNET_FOLDERS", "ControlNets", "ControlRequest", "controlnet_names", "pixel_perfect_resolution"]

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
        stem = name.strip()
        stem = stem.rsplit(" [", 1)[0] if stem.endswith("]") else stem  # the extension's "name [hash]"
        if stem in names:
            return names[stem]
        known = ", ".join(sorted(names)) or "none"
        raise SdlabError(f"ControlNet model {name!r} not found in {self.root / CONTROLNET_FOLDERS[0]} or "
                         f"{self.root / CONTROLNET_FOLDERS[1]} (found: {known})")

    def get(self, name: str, bundle) -> ControlNet:
        path = self.path(name)
        net = self._loaded.get(path)
        if net is None:
            # Refuses a ControlNet made for another family, in one line.
            net = load_controlnet(path, unet=bundle.unet, dtype=bundle.dtype, device=bundle.device)
            self._loaded[path] = net
        return net

    def units(self, requests: Sequence[ControlRequest | ControlUnit], bundle, width: int, height: int,
              init_image: Image.Image | None) -> list[ControlUnit]:
        """The request's units made concrete; SdlabError (one line) for a missing image, an unknown
        module, model, mode or a ControlNet of another family."""
        from sdlab.controlnet.preprocess import get_preprocessor

        out, used = [], set()
        for i, unit in enumerate(requests):
            if isinstance(unit, ControlUnit):
                out.append(unit)
                continue
            image = unit.image if unit.image is not None else init_image
            if image is None:
                raise SdlabError(f"ControlNet unit {i}: no control image (give one, or an init image for img2img)")
            preprocessor = get_preprocessor(unit.module)
            resolution = unit.processor_res
            if unit.pixel_perfect:
                resolution = pixel_perfect_resolution(image, width, height, unit.resize_mode)
            detected = preprocessor(image.convert("RGB"), resolution, unit.threshold_a, unit.threshold_b, unit.mask)
            hint = hint_tensor(resize_hint(np.asarray(detected), width, height, unit.resize_mode))
            mode = CONTROL_ALIASES.get(str(unit.control_mode), unit.control_mode)
            used.add(self.path(unit.model))
            out.append(ControlUnit(self.get(unit.model, bundle), hint, unit.weight, unit.guidance_start,
                                   unit.guidance_end, mode))
        # Keep only what this request used: ControlNets are UNet-sized.
        self._loaded = {p: net for p, net in self._loaded.items() if p in used}
        return out
