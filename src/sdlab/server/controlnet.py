"""sd-webui-controlnet's API over sdlab's ControlNet: the units of `alwayson_scripts`
(`{"controlnet": {"args": [unit, ...]}}`) made `ControlRequest`s, the model list with the
extension's "name [hash]" titles, and `/controlnet/detect`. Names, defaults and checks only; the
units run in the pipeline like those of every other face.

A unit's fields are the extension's `ControlNetUnit`'s. A field sdlab acts on is read; a field
of the extension that sdlab has no use for passes while it is off and is refused (422, naming
it) when on, as `convert.NotActedOn` does for request fields; any other field is refused, so a
misspelt field never leaves a unit silently at its default (the extension's issue #865).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..controlnet.units import (ControlRequest, control_mode_name, controlnet_names, find_controlnet,
                                resize_mode_name)
from ..errors import SdlabError
from .errors import Unsupported
from .settings import Limits

SCRIPT_NAME = "controlnet"  # the extension's script title, matched case-insensitively as A1111 does
API_VERSION = 3  # GET /controlnet/version of sd-webui-controlnet 1.1.4xx
HR_OPTIONS = ("Both", "Low res only", "High res only")

# Fields read, with the extension's defaults; legacy names (its `ControlNetUnit` still takes them).
UNIT_DEFAULTS: dict[str, Any] = {
    "enabled": False, "module": "none", "model": "None", "weight": 1.0, "image": None, "mask": None,
    "resize_mode": "Crop and Resize", "low_vram": False, "processor_res": -1, "threshold_a": -1,
    "threshold_b": -1, "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False,
    "control_mode": "Balanced", "hr_option": "Both", "save_detected_map": True,
    # Only for the web UI's "inpaint only masked" crop, which sdlab's units do not take part in.
    "inpaint_crop_input_image": True,
}
LEGACY_NAMES = {"input_image": "image", "mask_image": "mask", "lowvram": "low_vram", "guidance": "guidance_end"}
# Fields of the extension's unit for what sdlab does not do: each passes only with these values.
NOT_ACTED_ON: dict[str, tuple[Any, ...]] = {
    "advanced_weighting": (None, []),
    "effective_region_mask": (None, ""),
    "ipadapter_input": (None, []),
    "union_control_type": (None, "", "Unknown"),
    "input_mode": ("simple",),
    "batch_images": (None, "", []),
    "batch_image_files": (None, []),
    "batch_input_gallery": (None, []),
    "batch_mask_dir": (None, ""),
    "batch_mask_gallery": (None, []),
    "batch_keyframe_idx": (None, ""),
    "batch_modifiers": (None, []),
    "animatediff_batch": (False, None),
    "use_preview_as_input": (False, None),
    "generated_image": (None, ""),
    "pulid_mode": ("Fidelity", None),
}


@dataclass(frozen=True)
class ApiUnit:
    """One enabled unit of a request: what the pipeline runs, and whether its map is returned."""

    control: ControlRequest
    save_detected_map: bool = True


def _number(unit: dict, name: str, where: str) -> float:
    value = unit[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise Unsupported(f"{where}: {name}={value!r} is not a number") from None
    return float(value)


def _flag(unit: dict, name: str, where: str) -> bool:
    value = unit[name]
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise Unsupported(f"{where}: {name}={value!r} is not true or false")


def _images(unit: dict, where: str, limits: Limits) -> tuple[Image.Image | None, Image.Image | None]:
    """The unit's image and mask: base64, `{"image", "mask"}` or `[image, mask]`, as the extension takes them."""
    from .images import decode_image

    image, mask = unit["image"], unit["mask"]
    if isinstance(image, dict):
        unknown = sorted(set(image) - {"image", "mask"})
        if unknown:
            raise Unsupported(f"{where}: image has the field {unknown[0]!r}; an image object has image and mask")
        image, mask = image.get("image"), image.get("mask") or mask
    elif isinstance(image, (list, tuple)):
        if len(image) == 2 and all(isinstance(x, str) or x is None for x in image):
            image, mask = image[0], image[1] or mask
        elif len(image) == 1:
            return _images({**unit, "image": image[0]}, where, limits)
        elif image:
            raise Unsupported(f"{where}: {len(image)} images in one unit (the extension's batch input) is not "
                              "implemented by sdlab; send one image per unit")
        else:
            image = None
    if image is not None and not isinstance(image, str):
        raise Unsupported(f"{where}: image must be a base64 image, not {type(image).__name__}")
    if mask is not None and not isinstance(mask, str):
        raise Unsupported(f"{where}: mask must be a base64 image, not {type(mask).__name__}")
    return (decode_image(image, f"{where}: image", limits) if image else None,
            decode_image(mask, f"{where}: mask", limits) if mask else None)


def parse_unit(raw: Any, index: int, models_root: Path, limits: Limits, enable_hr: bool) -> ApiUnit | None:
    """One unit of `alwayson_scripts.controlnet.args`; None for a disabled one.

    Raises:
        Unsupported: a field sdlab does not know or does not act on, or a value it cannot use (422).
        BadInput: an image that does not decode (400).
    """
    from ..controlnet.preprocess import get_preprocessor

    where = f"ControlNet unit {index}"
    if not isinstance(raw, dict):
        raise Unsupported(f"{where}: a unit is an object of the extension's ControlNetUnit fields, not "
                          f"{type(raw).__name__}")
    unit = dict(UNIT_DEFAULTS)
    for key, value in raw.items():
        name = LEGACY_NAMES.get(key, key)
        if name in UNIT_DEFAULTS:
            unit[name] = value
        elif name in NOT_ACTED_ON:
            if value not in NOT_ACTED_ON[name]:
                raise Unsupported(f"{where}: {key}={value!r}: not implemented by sdlab; leave it out")
        elif key == "guessmode":
            raise Unsupported(f"{where}: guessmode is the extension's old field; send control_mode "
                              "\"ControlNet is more important\" instead")
        else:
            raise Unsupported(f"{where}: unknown field {key!r}; a unit takes "
                              f"{', '.join(sorted(UNIT_DEFAULTS))}")
    if not _flag(unit, "enabled", where):
        return None
    try:
        module = get_preprocessor(str(unit["module"])).name
        resize_mode = resize_mode_name(unit["resize_mode"])
        control_mode = control_mode_name(unit["control_mode"])
    except SdlabError as e:
        raise Unsupported(f"{where}: {e}") from None
    weight, start, end = (_number(unit, n, where) for n in ("weight", "guidance_start", "guidance_end"))
    if not 0.0 <= start <= end <= 1.0:
        raise Unsupported(f"{where}: guidance_start {start} and guidance_end {end} must satisfy "
                          "0 <= start <= end <= 1")
    hr_option = unit["hr_option"]
    if hr_option not in HR_OPTIONS:
        raise Unsupported(f"{where}: hr_option {hr_option!r} is not one of {', '.join(HR_OPTIONS)}")
    model = str(unit["model"] or "None")
    if model == "None":
        raise Unsupported(f"{where}: no model (model \"None\"); name one of GET /controlnet/model_list")
    titles = model_titles(models_root)
    names = {title.rsplit(" [", 1)[0]: title for title in titles}
    found = find_controlnet({n: titles[t] for n, t in names.items()}, model)
    if found is None:
        raise Unsupported(f"{where}: ControlNet model {model!r} not found in the models folder's ControlNet/ "
                          f"(found: {', '.join(sorted(titles)) or 'none'})")
    image, mask = _images(unit, where, limits)
    for name in ("low_vram", "pixel_perfect", "save_detected_map", "inpaint_crop_input_image"):
        _flag(unit, name, where)  # checked; low_vram and the crop flag change nothing here
    control = ControlRequest(
        names[found], image=image, module=module, weight=weight, guidance_start=start, guidance_end=end,
        control_mode=control_mode, resize_mode=resize_mode, processor_res=_number(unit, "processor_res", where),
        threshold_a=_number(unit, "threshold_a", where), threshold_b=_number(unit, "threshold_b", where),
        pixel_perfect=_flag(unit, "pixel_perfect", where), mask=mask, hr_option=hr_option)
    return ApiUnit(control, _flag(unit, "save_detected_map", where))


def parse_alwayson_scripts(scripts: dict[str, Any], models_root: Path, limits: Limits, enable_hr: bool,
                           img2img: bool, unit_count: int) -> list[ApiUnit]:
    """The enabled ControlNet units of a request's `alwayson_scripts`; every other script is refused
    in the web UI's words ("always on script X not found")."""
    problems, units = [], []
    for name, value in scripts.items():
        if name.lower() != SCRIPT_NAME:
            problems.append(f"always on script {name} not found (sdlab has ControlNet only; leave the others out "
                            "of alwayson_scripts)")
            continue
        args = value.get("args", []) if isinstance(value, dict) else value
        if not isinstance(args, list):
            raise Unsupported(f"alwayson_scripts.{name}.args must be a list of ControlNet units")
        for i, raw in enumerate(args):
            unit = parse_unit(raw, i, models_root, limits, enable_hr)
            if unit is not None:
                if unit.control.image is None and not img2img:
                    raise Unsupported(f"ControlNet unit {i}: no image (txt2img has no init image to use instead)")
                units.append(unit)
    if problems:
        raise Unsupported("; ".join(problems))
    if len(units) > unit_count:
        raise Unsupported(f"{len(units)} ControlNet units enabled; this server allows {unit_count} "
                          "(sdlab serve --control-net-unit-count)")
    return units


def model_titles(root: Path) -> dict[str, Path]:
    """The extension's model list: "name [hash]" (the web UI's old 8-digit hash of the file) -> path,
    in name order; a diffusers folder is hashed by its weights file."""
    from ..merge import legacy_hash

    out = {}
    for name, path in sorted(controlnet_names(root).items(), key=lambda kv: kv[0].lower()):
        file = path
        if path.is_dir():
            file = next((f for f in sorted(path.glob("diffusion_pytorch_model*.safetensors")) + sorted(
                path.glob("*.bin")) if f.is_file()), None)
        out[f"{name} [{legacy_hash(file)}]" if file is not None else name] = path
    return out
