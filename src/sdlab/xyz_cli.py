"""`sdlab grid`: the web UI's X/Y/Z plot from the command line (`recipes/xyz.py`). Every cell is
the request `sdlab generate` would make with the same flags and the axis values applied."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .errors import SdlabError, UsageError

# Request fields a grid takes from the flags `sdlab generate` has, besides the hires fix's.
_SKIP_FIELDS = {"init_image", "mask", "controls"}

_EPILOG = """axes (the web UI's labels, any case; short names: cfg, schedule, checkpoint, denoise, sr):
  Seed, Var. seed, Var. strength, Steps, Hires steps, CFG Scale, Prompt S/R, Prompt order, Sampler,
  Hires sampler, Checkpoint name, Schedule type, Eta, Clip skip, Denoising, Hires upscaler, Styles,
  RNG source, Size, Nothing

values: a comma list (quote a value that holds a comma: 'Prompt S/R: cat, "red, round"'),
  1-5, 1-5 (+2), 10-1 (-3), 1-10 [5] (five values from 1 to 10), 0.5-1 (+0.25), 0-1 [3].
  Prompt S/R: the first value is the text in the prompt that the others replace.

example:
  sdlab grid "a cat" --x "Steps: 10,20,30" --y "CFG scale: 5-9 (+2)" -m model.safetensors -o grid.png
"""


def register(sub) -> None:
    from .generate_cli import _add_common, _add_hires

    p = sub.add_parser("grid", help="X/Y/Z plot: a labelled grid of images over settings",
                       description="Make one image for every combination of the axes' values (the web UI's "
                                   "X/Y/Z plot) and draw them as a labelled grid; each cell is the image "
                                   "'sdlab generate' makes with those settings, saved beside the grid with "
                                   "its own parameters.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p, prompt_required=False)  # -o: a .png for the grid (cells in NAME-cells/), or a folder for both
    g = p.add_argument_group("X/Y/Z plot")
    g.add_argument("--x", required=True, metavar="'AXIS: VALUES'", help="the columns, e.g. 'Steps: 10,20,30'")
    g.add_argument("--y", default=None, metavar="'AXIS: VALUES'", help="the rows, e.g. 'CFG scale: 5-9 (+2)'")
    g.add_argument("--z", default=None, metavar="'AXIS: VALUES'",
                   help="one grid per value, joined side by side with its label above")
    g.add_argument("--no-legend", action="store_true", help="draw no labels")
    g.add_argument("--margin", type=int, default=0, help="pixels between cells (default 0)")
    g.add_argument("--vary-seeds", default="", metavar="x,y,z",
                   help="add the cell's index along these axes to the seed (the web UI's 'Vary seeds for X')")
    g.add_argument("--keep-random-seeds", action="store_true",
                   help="with a seed of -1, every cell draws its own seed (the web UI's 'Keep -1 for seeds'); "
                        "by default one random seed serves the whole grid")
    g.add_argument("--no-cells", action="store_true", help="write the grid only, not each cell's image")
    _add_hires(p)
    p.set_defaults(func=cmd_grid, mode="txt2img")


def _request(args: argparse.Namespace):
    from .generate_cli import PRESETS, _hires_fields, request_fields_from_infotext
    from .images import open_image
    from .request import GenerationRequest

    fields: dict = {}
    if args.from_image:
        from .infotext import read_infotext

        text = read_infotext(open_image(args.from_image, "PNG"))
        if not text:
            raise SdlabError(f"{args.from_image}: has no generation parameters (no 'parameters' text)")
        fields.update(request_fields_from_infotext(text))
    if args.preset:
        fields.update(PRESETS[args.preset])
    for f in dataclasses.fields(GenerationRequest):
        value = getattr(args, f.name, None)
        if f.name not in _SKIP_FIELDS and value is not None:
            fields[f.name] = value
    fields.update(_hires_fields(args))
    if getattr(args, "controls", None):  # ControlNet units, as `sdlab generate` reads them
        from .controlnet_cli import control_requests
        from .generate_cli import _models_dir

        fields["controls"] = control_requests(args.controls, _models_dir(args).root, init=False)
    if args.refiner:
        raise UsageError("sdlab grid does not take --refiner yet; make the refined images with sdlab generate")
    if not fields.get("prompt"):
        raise UsageError('give a prompt, e.g. sdlab grid "a red circle" --x "Steps: 10,20,30"')
    return GenerationRequest(**fields)


def cmd_grid(args: argparse.Namespace) -> None:
    from . import load
    from .checkpoints.io import atomic_write
    from .device import parse_dtype, parse_weight_dtype
    from .generate_cli import _models_dir, _resolve_model, _run_with_progress, _vae_path
    from .infotext import png_info
    from .outputs import save_image
    from .recipes import xyz
    from .request import check_request

    base = _request(args)
    models = _models_dir(args)
    axes = [xyz.parse_axis(text, "txt2img", f"--{name}") if text else None
            for name, text in (("x", args.x), ("y", args.y), ("z", args.z))]
    vary = {a.strip().lower() for a in args.vary_seeds.split(",") if a.strip()}
    if vary - {"x", "y", "z"}:
        raise UsageError(f"--vary-seeds: {args.vary_seeds!r} names no axis; write x, y, z or a list such as x,y")
    # Every cell is checked (and every checkpoint found) before a model loads.
    plan = xyz.plan(base, *axes, no_fixed_seeds=args.keep_random_seeds,
                    vary_seeds=("x" in vary, "y" in vary, "z" in vary), check=lambda r: check_request(r, models))
    checkpoints = {c.checkpoint: _resolve_model(args, c.checkpoint) for c in plan.cells if c.checkpoint}
    vae_path = _vae_path(args.vae, models) if args.vae else None

    def loaded(model: str | None):
        pipe = load(model, device=args.device, dtype=parse_dtype(args.dtype), prediction=args.prediction,
                    models_dir=args.models_dir, compile=args.compile, offload=args.offload,
                    weight_dtype=parse_weight_dtype(args.weight_dtype),
                    text_encoder_files={"clip_l": args.clip_l, "clip_g": args.clip_g, "t5xxl": args.t5},
                    t5_max_length=args.t5_max_length, vae=vae_path)
        if args.styles_file:
            pipe.styles_file = Path(args.styles_file)
        return pipe

    from tqdm import tqdm

    results, pipe, current = {}, None, object()
    with tqdm(total=len(plan.cells), desc="X/Y/Z plot", unit="image") as bar:
        for cell in plan.cells:
            model = checkpoints.get(cell.checkpoint, args.model)
            if model != current:
                pipe, current = None, model  # the previous model goes before the next one loads
                pipe = loaded(model)
            res = _run_with_progress(pipe, cell.request)
            results[plan.index(cell)] = res
            bar.update()
            if res.interrupted:
                break
    grid = xyz.assemble(plan, results, draw_legend=not args.no_legend, margin_size=args.margin)

    out = Path(args.output)
    if out.suffix.lower() == ".png":
        cells_dir = out.with_name(out.stem + "-cells")
        atomic_write(out, lambda tmp: grid.images[0].save(tmp, format="PNG", pnginfo=png_info(grid.infotexts[0])))
        grid_path = out
    else:
        cells_dir = out
        seed = next(r.seeds[0] for r in grid.results if r is not None and r.seeds)  # the first cell's
        grid_path = save_image(grid.images[0], out, seed, grid.infotexts[0])
    print(grid_path)
    if not args.no_cells:
        for res in grid.results:
            if res is None:
                continue
            for image, text, seed in zip(res.images, res.infotexts, res.seeds):
                print(save_image(image, cells_dir, seed, text))
    if grid.interrupted:
        raise SdlabError("interrupted; the grid of the cells so far was saved")
