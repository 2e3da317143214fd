"""`sdlab upscale` and `sdlab upscalers`: the web UI's Extras upscale from the command line.

    sdlab upscale photo.png --upscaler 4x-UltraSharp --scale 2 -o big.png
    sdlab upscale a.png b.png --upscaler R-ESRGAN --upscaler-2 Lanczos --visibility 0.5 -o out/

Every problem with the input (a missing image, an unknown upscaler, a file that is no model) is
one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .errors import MissingDependency, SdlabError, UsageError

log = logging.getLogger(__name__)

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def register(sub) -> None:
    from .upscalers import DEFAULT_OVERLAP, DEFAULT_TILE

    p = sub.add_parser(
        "upscale", help="upscale images with ESRGAN-type models, Lanczos or Nearest",
        description="Upscale images as the web UI's Extras tab does: an upscaler model from the models folder "
                    "(ESRGAN/, RealESRGAN/, SwinIR/, DAT/, HAT/ or ComfyUI's upscale_models/; needs spandrel: "
                    "pip install \"sdlab[upscale]\") or the built-in Lanczos and Nearest, tiled so that any size "
                    "fits in memory. The PNG keeps the input's generation parameters and gets the web UI's "
                    "'postprocessing' text.",
        epilog="example: sdlab upscale photo.png --upscaler 4x-UltraSharp --scale 2 -o photo-2x.png")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images to upscale")
    p.add_argument("-u", "--upscaler", required=True,
                   help="an upscaler name (see 'sdlab upscalers'), a model file, Lanczos or Nearest")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, default=None, help="scale by this factor (default 2)")
    size.add_argument("--size", metavar="WxH", default=None,
                      help="scale to this size: by max(W/w, H/h), then centred on a black WxH canvas "
                           "(--no-crop keeps the scaled image as it is)")
    p.add_argument("--no-crop", action="store_true", help="with --size: do not crop/pad to exactly WxH")
    p.add_argument("--upscaler-2", default="None", help="a second upscaler, blended in over the first")
    p.add_argument("--visibility", type=float, default=0.5,
                   help="how much of the second upscaler's result to blend in, 0-1 (with --upscaler-2)")
    p.add_argument("-o", "--output", default=None,
                   help="output file (.png, .jpg, .webp) for one image, or a folder (default: beside each image, "
                        "as NAME-upscaled.png)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile size in input pixels (0: no tiling)")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="tile overlap in input pixels")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: CUDA when available)")
    p.add_argument("--dtype", default=None,
                   help="fp32, fp16 or bf16 (default: fp16 on a GPU where the model allows it, fp32 on the CPU)")
    p.add_argument("--models-dir", default=None, help="models folder (default: $SDLAB_MODELS_DIR or ./models)")
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("upscalers", help="list the upscalers in the models folder",
                       description="List the upscalers the web UI's API would list: None, Lanczos, Nearest and the "
                                   "model files in the models folder's ESRGAN/, RealESRGAN/, SwinIR/, DAT/, HAT/ "
                                   "and upscale_models/.")
    p.add_argument("--models-dir", default=None, help="models folder (default: $SDLAB_MODELS_DIR or ./models)")
    p.set_defaults(func=cmd_upscalers)


def cmd_upscalers(args: argparse.Namespace) -> None:
    from .upscalers import Upscalers

    for e in Upscalers(args.models_dir).list():
        print(f"{e.name}  (x{e.scale:g}, {e.path})" if e.path else e.name)


def cmd_upscale(args: argparse.Namespace) -> None:
    try:
        _upscale(args)
    except MissingDependency:
        raise
    except SdlabError as e:  # a bad image, name, size or model file: a usage error (exit 2)
        raise UsageError(str(e)) from None


def _parse_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h)
    except ValueError:
        raise SdlabError(f"--size {text!r}: give WIDTHxHEIGHT, e.g. 1024x768") from None
    if not sep or width < 1 or height < 1:
        raise SdlabError(f"--size {text!r}: give WIDTHxHEIGHT, e.g. 1024x768")
    return width, height


def _upscale(args: argparse.Namespace) -> None:
    from .device import parse_dtype
    from .images import open_image
    from .upscalers import ExtrasUpscale, Upscalers

    if args.size is not None:
        width, height = _parse_size(args.size)
        options = ExtrasUpscale(args.upscaler, args.upscaler_2, args.visibility, resize_mode=1,
                                upscale_to_width=width, upscale_to_height=height, upscale_crop=not args.no_crop)
    else:
        options = ExtrasUpscale(args.upscaler, args.upscaler_2, args.visibility, resize_mode=0,
                                upscale_by=2.0 if args.scale is None else args.scale)
    if args.upscaler_2 != "None" and not 0 < args.visibility <= 1:
        raise SdlabError(f"--visibility {args.visibility}: give 0-1 (the share of --upscaler-2 in the result)")
    upscalers = Upscalers(args.models_dir, device=args.device, dtype=parse_dtype(args.dtype), tile=args.tile,
                          overlap=args.overlap, allow_paths=True)
    # Every name and image is checked before the first (slow) upscale.
    upscalers.find(args.upscaler)
    if args.upscaler_2 != "None":
        upscalers.find(args.upscaler_2)
    sources = [Path(p) for p in args.images]
    images = [open_image(p) for p in sources]
    targets = _targets(sources, args.output)
    for src, image, target in zip(sources, images, targets):
        result, text = _run_one(image, options, upscalers)
        _save(result, target, image, text)
        print(f"wrote {target} ({result.width}x{result.height})")


def _targets(sources: list[Path], output: str | None) -> list[Path]:
    if output is None:
        return [src.with_name(f"{src.stem}-upscaled.png") for src in sources]
    out = Path(output)
    if out.suffix.lower() in _FORMATS:
        if len(sources) > 1:
            raise SdlabError(f"-o {output}: {len(sources)} images need an output folder, not one file")
        return [out]
    if out.suffix:
        raise SdlabError(f"-o {output}: write .png, .jpg or .webp, or name a folder")
    return [out / f"{src.stem}-upscaled.png" for src in sources]


def _run_one(image, options, upscalers):
    from tqdm import tqdm

    from .upscalers import postprocess_infotext, upscale_extras

    bar = None

    def on_progress(p) -> None:
        nonlocal bar
        if bar is None or bar.desc != p.upscaler or p.done == 1:
            if bar is not None:
                bar.close()
            bar = tqdm(total=p.total, desc=p.upscaler, unit="tile", leave=False)
        bar.update(p.done - bar.n)

    try:
        result, info = upscale_extras(image, options, upscalers, on_progress)
    finally:
        if bar is not None:
            bar.close()
    return result, postprocess_infotext(info)


def _save(result, target: Path, source, text: str) -> None:
    """Write atomically; a PNG keeps the input's text chunks (its infotext) and gets the web UI's
    `postprocessing` text."""
    from PIL import PngImagePlugin

    from .checkpoints.io import atomic_write

    fmt = _FORMATS[target.suffix.lower()]
    params = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        for k, v in source.info.items():
            if isinstance(k, str) and isinstance(v, str) and k != "postprocessing":
                info.add_text(k, v)
        if text:
            info.add_text("postprocessing", text)
        params["pnginfo"] = info
    elif fmt == "JPEG":
        params["quality"] = 95
    atomic_write(target, lambda tmp: result.save(tmp, format=fmt, **params))
