"""A request whose script_name names one of `server/scripts.py`'s scripts, run as one queued job:
the request is translated as any other (`convert.prepare`), the script's recipe plans its requests,
every one of them is checked against the server's limits before any runs, and the answer is the
web UI's (the script's images in its order; `info` as its Processed, from the first request's).
The X/Y/Z plot goes to `server/xyz.py`."""

from __future__ import annotations

import json
from dataclasses import replace

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ..errors import SdlabError
from ..recipes import outpaint_scripts
from ..recipes.scripts import ScriptOutput
from ..request import GenerationRequest, GenerationResult
from ..styles import apply_styles
from .catalog import CheckpointEntry, NotFound
from .errors import NoModel, OverLimit, Unsupported
from .models import Img2ImgRequest, Txt2ImgRequest
from .scripts import Script, find, not_found, parse_script_args
from .state import ServerState
from .worker import Job, JobResult, TaskContext
from .xyz import MAX_GRID_PIXELS, _cell_check, _save, _today, run_xyz

Body = Txt2ImgRequest | Img2ImgRequest


def _plan(body: Body, kind: str, state: ServerState, script: Script):
    from .convert import prepare

    if isinstance(body, Img2ImgRequest) and body.mask and script.title in (outpaint_scripts.MK2_TITLE,
                                                                              outpaint_scripts.POOR_MANS_TITLE):
        raise SdlabError(f"{script.title} draws its own mask; leave mask out")
    prep = prepare(body, state)
    if prep.checkpoint is None:
        raise NoModel(f"no model to generate with: put a checkpoint in {state.catalog.root / 'Stable-diffusion'} "
                      "or start the server with --model")
    values = parse_script_args(script, list(body.script_args))
    # The client's own seeds: each script fixes a -1 seed by its own rule (prompts from file lets
    # every line draw one).
    request = replace(prep.request, seed=body.seed, subseed=body.subseed)
    try:
        plan = script.plan(values, request)
    except SdlabError as e:  # a value the script cannot take: 422, as the pipeline refuses one
        raise SdlabError(str(e) if str(e).startswith(script.title) else f"{script.title}: {e}") from None
    check = _cell_check(state)
    limits = state.settings.limits
    checkpoints: dict[str, CheckpointEntry] = {}
    pixels = 0
    for req, name in plan.checks:
        try:
            check(req)
            apply_styles(req, state.styles_file)  # a line's --styles must be in the file
        except OverLimit:
            raise
        except SdlabError as e:
            raise SdlabError(f"{script.title}: {e}") from None
        if req.batch_size * req.n_iter > limits.max_batch:
            raise OverLimit(f"{script.title}: batch_size x n_iter = {req.batch_size * req.n_iter} images in one "
                            f"request; this server makes at most {limits.max_batch}")
        pixels += (req.width or 512) * (req.height or 512) * req.batch_size * req.n_iter
        if name is not None and name not in checkpoints:
            try:
                checkpoints[name] = state.catalog.find_checkpoint(name)
            except NotFound as e:
                raise SdlabError(f"{script.title}: --sd_model: {e}") from None
    if pixels > MAX_GRID_PIXELS:
        raise OverLimit(f"{script.title}: its images would have {pixels / 1e6:.0f} MPixels; at most "
                        f"{MAX_GRID_PIXELS // 1_000_000} (the web UI's img_max_size_mp)")
    return prep, plan, checkpoints


async def run_script(body: Body, kind: str, state: ServerState, request: Request) -> dict | Response:
    """The handler of a txt2img / img2img request whose script_name names a script of `SCRIPTS`."""
    from .convert import echo_parameters, info_json
    from .images import encode_png
    from .waiting import ClientGone, run_job

    script = find(body.script_name, kind)
    if script is None:
        from .convert import prepare

        await run_in_threadpool(prepare, body, state)  # refuses it, with every other problem of the request
        raise Unsupported(not_found(str(body.script_name), kind))
    if script.plan is None:
        return await run_xyz(body, kind, state, request)
    prep, plan, checkpoints = await run_in_threadpool(_plan, body, kind, state, script)
    save_to = state.outputs_dir if body.save_images else None

    def work(ctx: TaskContext) -> tuple[ScriptOutput, list[str], CheckpointEntry]:
        done = [0]
        entry = [prep.checkpoint]

        def generate(req: GenerationRequest, checkpoint: str | None) -> GenerationResult:
            n = done[0]
            ctx.jobs(n, plan.count)
            pipe = ctx.pipeline(checkpoints.get(checkpoint, prep.checkpoint) if checkpoint else prep.checkpoint)
            if n == 0:
                entry[0] = ctx.loaded or entry[0]

            def callback(p) -> None:
                ctx.progress(p.step, p.total, f"{script.title}: {n + 1} out of {plan.count}, step {p.step}/{p.total}",
                             p.preview)

            res = pipe.generate(req, callback)
            done[0] += 1
            return res

        out = plan.run(generate)
        ctx.jobs(plan.count, plan.count)
        saved: list[str] = []
        if save_to is not None:
            from ..outputs import save_image

            first, grids = out.results[0], out.grids
            if out.intermediate:  # outpainting's tiles and strips are steps; its images are what it made
                for img, text in zip(out.images[grids:], out.infotexts[grids:]):
                    _save(save_to, [img], [text], first.seeds[:1], first.request.mode, saved)
            else:
                for res in out.results:
                    _save(save_to, res.images, res.infotexts, res.seeds, res.request.mode, saved)
            for img, text in zip(out.images[:grids], out.infotexts[:grids]):
                folder = save_to / f"{'img2img' if kind == 'img2img' else 'txt2img'}-grids" / _today()
                saved.insert(0, save_image(img, folder, first.seeds[0], text).relative_to(save_to).as_posix())
        return out, saved, entry[0]

    try:
        out, saved, entry = await run_job(Job(kind, prep.checkpoint, task=work, options=prep.load_options), state, request)  # type: ignore[arg-type]
    except ClientGone:
        return Response(status_code=499)

    def respond() -> dict:
        images = [encode_png(img, text or None) for img, text in zip(out.images, out.infotexts)]
        first = out.results[0]
        first_prep = replace(prep, request=first.request)
        from ..sampling.samplers import resolve_sampler

        first_prep.sampler_name = resolve_sampler(first.request.sampler).name
        seeds = [s for r in out.results for s in r.seeds]
        subseeds = [s for r in out.results for s in r.subseeds]
        result = GenerationResult(out.images, out.infotexts, seeds, subseeds, first.request, out.interrupted)
        info = json.loads(info_json(JobResult(result, entry, out.interrupted, 0, saved), first_prep))
        info.update(index_of_first_image=out.index_of_first_image, steps_done=None,
                    all_prompts=out.all_prompts or [r.request.prompt for r in out.results])
        return {"images": images if body.send_images else [], "parameters": echo_parameters(body),
                "info": json.dumps(info)}

    return await run_in_threadpool(respond)
