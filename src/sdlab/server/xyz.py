"""The web UI's "X/Y/Z plot" script on /sdapi/v1/txt2img and /img2img (`script_name: "x/y/z plot"`,
`script_args` in web UI 1.10's positional order). The request is translated as any other
(`convert.prepare`), each cell of the plot (`recipes.xyz.plan`) runs as one ordinary request in
one queued job, and the answer is the web UI's: the grid first in `images`, then the sub-grids
and the cells as `include_sub_grids` / `include_lone_images` ask, `info` as the first cell's."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ..errors import SdlabError
from ..pipeline import GenerationRequest, GenerationResult, Interrupted
from ..recipes import xyz
from .catalog import CheckpointEntry, NotFound
from .errors import BadInput, NoModel, OverLimit
from .models import Img2ImgRequest, Txt2ImgRequest
from .state import ServerState
from .worker import Job, JobResult, TaskContext


# The 18 positional script_args of web UI 1.10 and the defaults its UI gives those a client leaves
# out (x_type 1 is Seed there).
ARG_NAMES = ("x_type", "x_values", "x_values_dropdown", "y_type", "y_values", "y_values_dropdown", "z_type",
             "z_values", "z_values_dropdown", "draw_legend", "include_lone_images", "include_sub_grids",
             "no_fixed_seeds", "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "margin_size", "csv_mode")
ARG_DEFAULTS = (1, "", None, 0, "", None, 0, "", None, True, False, False, False, False, False, False, 0, False)
MAX_GRID_PIXELS = 200_000_000  # the web UI's img_max_size_mp default (200 MP)


@dataclass
class XYZArgs:
    axes: tuple[xyz.AxisSpec, xyz.AxisSpec, xyz.AxisSpec]
    draw_legend: bool
    include_lone_images: bool
    include_sub_grids: bool
    no_fixed_seeds: bool
    vary_seeds: tuple[bool, bool, bool]
    margin_size: int
    csv_mode: bool


def parse_script_args(args: list[Any], mode: xyz.Mode) -> XYZArgs:
    """script_args -> XYZArgs; one line naming the argument at fault."""
    if len(args) > len(ARG_NAMES):
        raise BadInput(f"script_args: x/y/z plot takes {len(ARG_NAMES)} values ({', '.join(ARG_NAMES)}), "
                       f"got {len(args)}")
    v = dict(zip(ARG_NAMES, [*args, *ARG_DEFAULTS[len(args):]]))
    axes = []
    for name in "xyz":
        try:
            option = xyz.find_axis(v[f"{name}_type"], mode, f"script_args {name}_type")
        except SdlabError as e:
            raise BadInput(str(e)) from None
        text, dropdown = v[f"{name}_values"], v[f"{name}_values_dropdown"]
        if not isinstance(text, str):
            text = "" if text is None else xyz.list_to_csv([str(t) for t in text]) if isinstance(text, list) \
                else str(text)
        if dropdown is not None and not isinstance(dropdown, list):
            raise BadInput(f"script_args {name}_values_dropdown: expected a list of values, got {dropdown!r}")
        axes.append(xyz.AxisSpec(option, text, [str(d) for d in dropdown] if dropdown else None))
    try:
        margin = int(v["margin_size"] or 0)
    except (TypeError, ValueError):
        raise BadInput(f"script_args margin_size: expected pixels, got {v['margin_size']!r}") from None
    if not 0 <= margin <= 500:
        raise BadInput(f"script_args margin_size: {margin} is outside 0-500")
    return XYZArgs(tuple(axes), bool(v["draw_legend"]), bool(v["include_lone_images"]),  # type: ignore[arg-type]
                   bool(v["include_sub_grids"]), bool(v["no_fixed_seeds"]),
                   (bool(v["vary_seeds_x"]), bool(v["vary_seeds_y"]), bool(v["vary_seeds_z"])), margin,
                   bool(v["csv_mode"]))


def _cell_check(state: ServerState):
    """Each cell's request against the server's limits and the models folder, before any runs."""
    from ..hires import request_target, second_pass_steps
    from ..request import check_request

    limits = state.settings.limits

    def check(req: GenerationRequest) -> None:
        check_request(req, state.catalog.models)
        w, h = req.width or 512, req.height or 512
        if w * h > limits.max_pixels:
            raise OverLimit(f"{w}x{h} is more pixels than this server allows ({limits.max_pixels})")
        if req.steps > limits.max_steps:
            raise OverLimit(f"steps {req.steps} is more than this server allows ({limits.max_steps})")
        if req.enable_hr:
            tw, th = request_target(replace(req, width=w, height=h)).size
            if tw * th > limits.max_pixels:
                raise OverLimit(f"hires fix to {tw}x{th} is more pixels than this server allows ({limits.max_pixels})")
            if second_pass_steps(req) > limits.max_steps:
                raise OverLimit(f"hires steps {second_pass_steps(req)} is more than this server allows "
                                f"({limits.max_steps})")

    return check


def _plan(body: Txt2ImgRequest | Img2ImgRequest, kind: str, state: ServerState):
    from .convert import prepare

    prep = prepare(body, state)
    if prep.checkpoint is None:
        raise NoModel(f"no model to generate with: put a checkpoint in {state.catalog.root / 'Stable-diffusion'} "
                      "or start the server with --model")
    args = parse_script_args(list(body.script_args), "img2img" if kind == "img2img" else "txt2img")
    base = prep.request
    if args.no_fixed_seeds and (body.seed is None or body.seed < 0):
        base = replace(base, seed=-1)  # each cell draws its own, as the web UI's "Keep -1 for seeds"
    try:
        plan = xyz.plan(base, *args.axes, csv_mode=args.csv_mode, no_fixed_seeds=args.no_fixed_seeds,
                        vary_seeds=args.vary_seeds, check=_cell_check(state))
    except OverLimit:
        raise
    except SdlabError as e:
        raise BadInput(str(e) if str(e).startswith("X/Y/Z") else f"x/y/z plot: {e}") from None
    checkpoints: dict[str, CheckpointEntry] = {}
    for cell in plan.cells:
        if cell.checkpoint is not None and cell.checkpoint not in checkpoints:
            try:
                checkpoints[cell.checkpoint] = state.catalog.find_checkpoint(cell.checkpoint)
            except NotFound as e:
                raise BadInput(f"x/y/z plot: Checkpoint name: {e}") from None
    pixels = sum((c.request.width or 512) * (c.request.height or 512) for c in plan.cells)
    if pixels > MAX_GRID_PIXELS:
        raise OverLimit(f"x/y/z plot: the grid would have {pixels / 1e6:.0f} MPixels; at most "
                        f"{MAX_GRID_PIXELS // 1_000_000} (the web UI's img_max_size_mp)")
    return prep, args, plan, checkpoints


async def run_xyz(body: Txt2ImgRequest | Img2ImgRequest, kind: str, state: ServerState,
                  request: Request) -> dict | Response:
    """The handler of a txt2img / img2img request with script_name "x/y/z plot"."""
    from .convert import echo_parameters, info_json
    from .images import encode_png
    from .waiting import ClientGone, run_job

    prep, args, plan, checkpoints = await run_in_threadpool(_plan, body, kind, state)
    save_to = state.outputs_dir if body.save_images else None
    total = len(plan.cells)

    def work(ctx: TaskContext) -> tuple[xyz.Grid, list[str], CheckpointEntry]:
        results: dict[int, GenerationResult] = {}
        saved: list[str] = []
        entry = prep.checkpoint
        for n, cell in enumerate(plan.cells):
            ctx.jobs(n, total)
            pipe = ctx.pipeline(checkpoints.get(cell.checkpoint, prep.checkpoint))

            def callback(p, n=n) -> None:
                ctx.progress(p.step, p.total, f"X/Y/Z plot: {n + 1} out of {total}, step {p.step}/{p.total}",
                             p.preview)

            try:
                res = pipe.generate(cell.request, callback)
            except Interrupted:
                break
            results[plan.index(cell)] = res
            if n == 0:
                entry = ctx.loaded or entry
            if save_to is not None and res.images and not res.interrupted:
                _save(save_to, res.images, res.infotexts, res.seeds, res.request.mode, saved)
            if res.interrupted:
                break
        ctx.jobs(total, total)
        grid = xyz.assemble(plan, results, draw_legend=args.draw_legend,
                            include_lone_images=args.include_lone_images, include_sub_grids=args.include_sub_grids,
                            margin_size=args.margin_size)
        if save_to is not None and not grid.interrupted:
            from ..outputs import save_image

            folder = save_to / f"{'img2img' if kind == 'img2img' else 'txt2img'}-grids" / _today()
            seed = next(r.seeds[0] for r in grid.results if r is not None and r.seeds)
            path = save_image(grid.images[0], folder, seed, grid.infotexts[0])
            saved.insert(0, path.relative_to(save_to).as_posix())
        return grid, saved, entry

    try:
        done = await run_job(Job(kind, prep.checkpoint, task=work, options=prep.load_options), state, request)  # type: ignore[arg-type]
    except ClientGone:
        return Response(status_code=499)
    grid, saved, entry = done

    def respond() -> dict:
        images = [encode_png(img, text or None) for img, text in zip(grid.images, grid.infotexts)]
        first = grid.results[0]
        first_prep = replace(prep, request=first.request if first is not None else prep.request)
        if first is not None:
            from ..sampling.samplers import resolve_sampler

            first_prep.sampler_name = resolve_sampler(first.request.sampler).name
        # The web UI's info is the first cell's Processed, with the grid's images and infotexts.
        result = GenerationResult(grid.images, grid.infotexts, grid.seeds or [first_prep.request.seed], [],
                                  first_prep.request, grid.interrupted)
        info = json.loads(info_json(JobResult(result, entry, grid.interrupted, 0, saved), first_prep))
        info.update(index_of_first_image=1, all_prompts=[r.request.prompt if r else "" for r in grid.results],
                    all_subseeds=[r.subseeds[0] if r and r.subseeds else -1 for r in grid.results],
                    steps_done=None)
        return {"images": images if body.send_images else [], "parameters": echo_parameters(body),
                "info": json.dumps(info)}

    return await run_in_threadpool(respond)


def _today() -> str:
    import datetime

    return datetime.date.today().isoformat()


def _save(outputs, images, infotexts, seeds, mode, saved: list[str]) -> None:
    from ..outputs import samples_folder, save_image

    folder = samples_folder(outputs, mode)
    for image, text, seed in zip(images, infotexts, seeds):
        saved.append(save_image(image, folder, seed, text).relative_to(outputs).as_posix())
