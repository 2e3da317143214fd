"""`sdlab merge`: the web UI's checkpoint merger from the command line.

    sdlab merge a.safetensors b.safetensors --multiplier 0.3 -o merged.safetensors
    sdlab merge inpaint.safetensors custom.safetensors v1-5.safetensors --mode add-difference --multiplier 1
    sdlab merge model.ckpt --mode no-interpolation --fp16 --bake-vae vae-ft-mse.safetensors -o model-fp16.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SdlabError

if TYPE_CHECKING:
    from .merge import MergeInput
    from .models_dir import ModelsDir


# The CLI's names of the web UI's modes (merge.MODES; not imported here: that would load torch
# for `sdlab --help`).
MODE_NAMES = ("weighted-sum", "add-difference", "no-interpolation")


def register(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge checkpoints as the web UI's checkpoint merger",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge two or three checkpoints as the web UI's Checkpoint Merger tab does, tensor by tensor "
                    "(memory stays far below the models' size).\n\n"
                    "  weighted-sum      A * (1 - M) + B * M\n"
                    "  add-difference    A + (B - C) * M\n"
                    "  no-interpolation  A alone: to save it as fp16, bake in a VAE or discard weights\n\n"
                    "An inpainting (or instruct-pix2pix) model must be A; its extra input channels are kept. "
                    "Models are files, diffusers folders or names in the models folder's Stable-diffusion/.",
        epilog="example: sdlab merge sd-inpainting.safetensors mymodel.safetensors v1-5.safetensors "
               "--mode add-difference --multiplier 1 -o mymodel-inpainting.safetensors")
    p.add_argument("a", metavar="A", help="the primary model")
    p.add_argument("b", metavar="B", nargs="?", default=None, help="the secondary model (not with no-interpolation)")
    p.add_argument("c", metavar="C", nargs="?", default=None, help="the tertiary model (add-difference only)")
    p.add_argument("--mode", choices=MODE_NAMES, default="weighted-sum", help="how to combine the models")
    p.add_argument("-m", "--multiplier", type=float, default=0.3, help="M (0 gives A)")
    p.add_argument("--fp16", action="store_true", help="save fp32 tensors as fp16 (half the size)")
    p.add_argument("--bake-vae", metavar="VAE", default=None,
                   help="a VAE file, or a name in the models folder's VAE/, whose weights replace A's VAE")
    p.add_argument("--discard", metavar="REGEX", default="",
                   help="leave out every weight whose key matches this regular expression (e.g. '^model_ema')")
    p.add_argument("--metadata", metavar="JSON", default=None, help="extra safetensors metadata, a JSON object")
    p.add_argument("--no-metadata", action="store_true",
                   help="write no metadata (no merge recipe, nothing copied from the inputs)")
    p.add_argument("--no-recipe", action="store_true", help="leave out sd_merge_recipe and sd_merge_models")
    p.add_argument("--no-copy-metadata", action="store_true", help="do not copy the inputs' own metadata")
    p.add_argument("-o", "--output", default=None,
                   help="the merged .safetensors file, or a folder (default: A's folder, named as the web UI "
                        "names merges: '0.7(a) + 0.3(b).safetensors')")
    p.add_argument("--models-dir", default=None, help="models folder (default: $SDLAB_MODELS_DIR or ./models)")
    p.set_defaults(func=cmd_merge)


def _input(text: str, models: ModelsDir) -> MergeInput:
    """A model named on the command line: a path, `demo`, or a name in the models folder."""
    from .merge import MergeInput

    path = Path(text).expanduser()
    if path.exists():
        return MergeInput(path)
    from .demo_model import builtin_model

    if (demo := builtin_model(text)) is not None:
        return MergeInput(Path(demo))
    found = models.resolve_checkpoint(text)
    return MergeInput(found, found.relative_to(models.folder("checkpoint").resolve()).as_posix()
                      if found.is_relative_to(models.folder("checkpoint").resolve()) else "")


def cmd_merge(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .errors import UsageError
    from .merge import MODES, MergeOptions, merge_checkpoints
    from .models_dir import ModelsDir

    models = ModelsDir(args.models_dir)
    try:
        a = _input(args.a, models)
        b = _input(args.b, models) if args.b is not None else None
        c = _input(args.c, models) if args.c is not None else None
        extra = {}
        if args.metadata is not None:
            try:
                extra = json.loads(args.metadata)
            except ValueError as e:
                raise SdlabError(f"--metadata: not JSON ({e})") from None
            if not isinstance(extra, dict):
                raise SdlabError("--metadata: give a JSON object, e.g. '{\"author\": \"me\"}'")
        vae = None
        if args.bake_vae is not None:
            vae = Path(args.bake_vae).expanduser()
            if not vae.is_file():
                vae = models.resolve_vae(args.bake_vae)
        options = MergeOptions(MODES[args.mode], args.multiplier, args.fp16, vae, args.discard,
                               save_metadata=not args.no_metadata, add_merge_recipe=not args.no_recipe,
                               copy_metadata_fields=not args.no_copy_metadata, metadata=extra,
                               bake_in_vae_name=vae.name if vae is not None else "None")
    except SdlabError as e:  # names and options: checked before any tensor is read
        raise UsageError(str(e)) from None
    out = Path(args.output) if args.output else a.path.parent
    if out.suffix and out.suffix.lower() != ".safetensors":
        raise UsageError(f"-o {args.output}: the merged checkpoint must be a .safetensors file (or a folder)")

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="merging", unit="tensor", leave=False)
        bar.update(done - bar.n)

    try:
        result = merge_checkpoints(a, b, c, out, options, progress=progress)
    except SdlabError as e:  # two families, an inpainting model as B, a VAE of another shape: usage errors
        raise UsageError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
    kind = " (inpainting)" if result.is_inpainting else " (instruct-pix2pix)" if result.is_instruct_pix2pix else ""
    print(f"wrote {result.path}{kind}: {result.merged} tensors merged, {result.kept} kept from A")
