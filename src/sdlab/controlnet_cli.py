"""ControlNet on the command line: the `--control` unit flags of `sdlab generate` / `img2img` /
`inpaint` (one unit per `--control`; the unit flags after it set that unit), the units of a PNG
that `--from` replays (`--control-image` given again, one per `ControlNet N` line) and `sdlab
detect`, which runs a preprocessor and saves its map. Imports nothing heavy until a command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import SdlabError

# --control-* flag -> ControlRequest field, with its type.
UNIT_FLAGS = {
    "image": ("--control-image", str, "the unit's hint source image (default: the init image in img2img)"),
    "mask": ("--control-mask", str, "a mask for the inpaint preprocessors, white: repaint (default: none)"),
    "module": ("--control-module", str, "the preprocessor: canny, none (the image already is a map), ... "
                                        "(see sdlab detect --list; default none)"),
    "weight": ("--control-weight", float, "the unit's weight (default 1)"),
    "guidance_start": ("--control-start", float, "fraction of the steps where the unit starts (default 0)"),
    "guidance_end": ("--control-end", float, "fraction of the steps where it stops (default 1)"),
    "control_mode": ("--control-mode", str, "balanced (default), prompt (my prompt is more important) or "
                                            "controlnet (ControlNet is more important)"),
    "resize_mode": ("--control-resize", str, "how the map fits the image size: just (stretch), crop (default: "
                                             "cover and crop) or fill (fit and pad)"),
    "processor_res": ("--control-res", float, "the preprocessor's resolution (default: its own, 512 for most)"),
    "threshold_a": ("--control-threshold-a", float, "the preprocessor's first slider, e.g. canny's low threshold "
                                                    "(default: the preprocessor's own, 100 for canny)"),
    "threshold_b": ("--control-threshold-b", float, "the preprocessor's second slider, e.g. canny's high threshold "
                                                    "(default: the preprocessor's own, 200 for canny)"),
}


_METAVARS = {"image": "IMAGE", "mask": "MASK", "module": "MODULE", "weight": "W", "guidance_start": "FRACTION",
             "guidance_end": "FRACTION", "control_mode": "MODE", "resize_mode": "MODE", "processor_res": "RES",
             "threshold_a": "A", "threshold_b": "B"}


class _NewUnit(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        units = list(getattr(namespace, "controls", None) or [])
        units.append({"model": values})
        namespace.controls = units


class _UnitField(argparse.Action):
    """A --control-* flag: sets a field of the unit that the last --control began."""

    def __call__(self, parser, namespace, values, option_string=None):
        units = getattr(namespace, "controls", None)
        field = self.dest.removeprefix("control_")
        if not units and field == "image":
            # No --control yet: the control images of the units `--from` replays, in order.
            namespace.replay_control_images = [*(getattr(namespace, "replay_control_images", None) or []), values]
            return
        if not units:
            parser.error(f"{option_string} must follow the --control MODEL it belongs to")
        if field in units[-1]:
            parser.error(f"{option_string} given twice for --control {units[-1]['model']}; give "
                         "--control again for another unit")
        units[-1][field] = True if self.nargs == 0 else values


def add_control_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet", "one unit per --control; the --control-* flags after it set that unit "
                                           "(repeat --control for several units)")
    g.add_argument("--control", dest="controls", action=_NewUnit, default=None, metavar="MODEL",
                   help="a ControlNet: a file, a diffusers folder, or a name in the models folder's ControlNet/ "
                        "(or ComfyUI's controlnet/); repeat for several units (default: none)")
    for field, (flag, kind, text) in UNIT_FLAGS.items():
        g.add_argument(flag, dest=f"control_{field}", action=_UnitField, type=kind, default=argparse.SUPPRESS,
                       metavar=_METAVARS.get(field, "X"), help=text)
    g.add_argument("--control-pixel-perfect", dest="control_pixel_perfect", action=_UnitField, nargs=0,
                   default=argparse.SUPPRESS, help="the preprocessor resolution that fits the image size")


def control_requests(units: list[dict] | None, models_root: Path, init: bool) -> list:
    """`ControlRequest`s of the parsed unit flags, every name checked before a model loads:
    the model, the image files, the module and the modes. `init`: an init image stands in for a
    missing --control-image."""
    from .controlnet.preprocess import get_preprocessor
    from .controlnet.units import ControlNets, ControlRequest, control_mode_name, resize_mode_name
    from .images import open_image

    out = []
    for i, unit in enumerate(units or []):
        fields = dict(unit)
        ControlNets(models_root).path(fields["model"])  # found, or one line naming the folders
        if "image" in fields:
            fields["image"] = open_image(fields["image"], "control image")
        elif not init:
            raise SdlabError(f"--control {unit['model']}: give --control-image (only img2img and inpaint use the "
                             "init image instead)")
        if "mask" in fields:
            fields["mask"] = open_image(fields["mask"], "control mask")
        fields["module"] = get_preprocessor(fields.get("module", "none")).name
        fields["control_mode"] = control_mode_name(fields.get("control_mode", "Balanced"))
        fields["resize_mode"] = resize_mode_name(fields.get("resize_mode", "Crop and Resize"))
        fields["pixel_perfect"] = bool(fields.get("pixel_perfect", False))
        out.append(ControlRequest(**fields))
    return out


def replayed_units(infotext: str, images: list[str] | None, init: bool) -> list[dict]:
    """The unit dicts (as `--control` flags make them) of a PNG's `ControlNet N` lines, each with
    its control image from `images` in order: the infotext cannot carry images. `init`: an init
    image stands in for a missing one (img2img), as for `--control`.

    Raises:
        SdlabError: more images than lines, or a line left without one.
    """
    from .controlnet.units import infotext_units
    from .infotext import parse_infotext

    units = infotext_units(parse_infotext(infotext))
    images = list(images or [])
    if len(images) > len(units):
        raise SdlabError(f"{len(images)} --control-image given but the PNG's infotext has {len(units)} ControlNet "
                         "line(s); give one --control-image per line, or --control MODEL before each image")
    for i, unit in enumerate(units):
        if i < len(images):
            unit["image"] = images[i]
        elif not init:
            raise SdlabError(f"the PNG's infotext has ControlNet {i} ({unit.get('module', 'none')}, model "
                             f"{unit['model']}): give its control image again with --control-image IMAGE (one per "
                             "ControlNet line, in order; an infotext cannot carry images)")
    return units


def register(sub) -> None:
    p = sub.add_parser("detect", help="run a ControlNet preprocessor on an image",
                       description="Make the hint image (detected map) of a ControlNet preprocessor, as the "
                                   "ControlNet extension's modules make them, and save it as a PNG.",
                       epilog="example: sdlab detect canny photo.png -o edges.png --threshold-a 50 --threshold-b 150")
    p.add_argument("module", nargs="?", help="the preprocessor (its API name or UI label): canny, invert, "
                                             "lineart_standard, scribble_xdog, ... (see --list)")
    p.add_argument("image", nargs="?", help="the input image")
    p.add_argument("-o", "--output", default=None, help="the map's PNG (default: IMAGE-MODULE.png beside IMAGE)")
    p.add_argument("--res", type=float, default=-1, help="processor resolution (default: the module's, 512 for most)")
    p.add_argument("--threshold-a", type=float, default=-1, help="the module's first slider (default: its own)")
    p.add_argument("--threshold-b", type=float, default=-1, help="the module's second slider (default: its own)")
    p.add_argument("--mask", default=None, help="a mask for the inpaint modules (white: repaint)")
    p.add_argument("--list", action="store_true", help="list the modules with their sliders and stop")
    p.set_defaults(func=cmd_detect)


def cmd_detect(args: argparse.Namespace) -> None:
    from .controlnet.preprocess import get_preprocessor, module_names

    if args.list:
        for name in module_names():
            pre = get_preprocessor(name)
            sliders = ([pre.resolution] if pre.resolution else []) + list(pre.sliders)
            text = ", ".join(f"{s.label} {s.value:g} ({s.minimum:g}-{s.maximum:g})" for s in sliders)
            needs = f"  needs {' and '.join(pre.annotator_files)}" if not pre.available else ""
            print(f"{name:<24}{text}{needs}".rstrip())
        return
    if not args.module or not args.image:
        raise SdlabError("give a module and an image, e.g. sdlab detect canny photo.png -o edges.png")
    import numpy as np
    from PIL import Image

    from .checkpoints.io import atomic_write
    from .images import open_image

    pre = get_preprocessor(args.module)
    image = open_image(args.image, "image")
    mask = open_image(args.mask, "mask") if args.mask else None
    result = pre(image if pre.needs_mask else image.convert("RGB"), args.res, args.threshold_a, args.threshold_b,
                 mask)
    out = Path(args.output) if args.output else Path(args.image).with_name(f"{Path(args.image).stem}-{pre.name}.png")
    atomic_write(out, lambda tmp: Image.fromarray(np.ascontiguousarray(result)).save(tmp, format="PNG"))
    print(out)
