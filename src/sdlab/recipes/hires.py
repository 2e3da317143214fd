"""The web UI's hires fix as a recipe over the generation steps: the first pass is an ordinary
txt2img batch (`recipes.webui`); this is the second pass, one more `steps.sample` on the
upscaled latent (A1111 `processing.py` `sample_hr_pass`; the rules are in `sdlab.hires`).

    x (first pass, w x h)
      |-- latent mode:   interpolate(x, (to_y // 8, to_x // 8), mode, antialias)
      `-- image upscaler: decode -> uint8 -> upscale (Upscalers) -> LANCZOS to size -> encode
    centre crop (hr_resize_x and _y both set)
    PerImageNoise(same seeds, the new latent shape)   the first pass's noise is not reused
    noised(sigmas[0]) -> sample the last n steps of an int(n / min(denoise, 0.999))-step schedule
      with the hires prompts, sampler, schedule and CFG (a refiner switches in as in pass 1)
      and the request's ControlNet units again, their maps fitted to the hires size
      (`controlnet.apply.for_hires`: the extension's rules, canny and mlsd soft)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .. import hires as rules
from .. import steps
from . import passes
from ..controlnet.apply import for_hires
from ..errors import SdlabError
from ..images import to_tensor
from ..request import Progress
from ..sampling.noise import NoiseSource, PerImageNoise
from ..sampling.samplers import get_sampler_sigmas, resolve_sampler
from ..text.prompt import extract_extra_networks

if TYPE_CHECKING:
    from ..pipeline import Pipeline
    from ..upscalers import Upscalers
    from .passes import Run

__all__ = ["HiresRun", "prepare", "second_pass", "shift_progress", "upscale_latent"]

ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class HiresRun:
    """The second pass made ready once per request: its own `Run` (hires size, prompts, sampler,
    CFG; `sigmas` the tail that runs), where the latent goes and how it gets there."""

    run: Run
    target: rules.HiresTarget
    mode: tuple[str, bool] | None  # latent interpolation; None: the image upscaler `upscaler`
    upscaler: str | None
    steps: int  # sampler steps the pass runs (0: denoising strength 0, no sampling)


def prepare(pipe: Pipeline, run: Run) -> HiresRun:
    """Encode the hires prompts and make the second pass's sigmas. `run` is the first pass's."""
    req = run.req
    factor = pipe.bundle.config.vae.downsample_factor
    target = rules.request_target(req, factor)
    rules.check_hires(req)
    mode = rules.latent_mode(req.hr_upscaler)
    upscaler = None
    if mode is None:
        upscaler = upscalers_of(pipe).find(req.hr_upscaler).name
    n = rules.second_pass_steps(req)
    sampler = resolve_sampler(req.hr_sampler_name or run.sampler.name)
    schedule = rules.hr_schedule_name(req, sampler.default_schedule)
    prompt, negative = req.hr_prompt or req.prompt, req.hr_negative_prompt or req.negative_prompt
    prompt_text, networks = extract_extra_networks(prompt)
    negative_text, _ = extract_extra_networks(negative)
    if networks != extract_extra_networks(req.prompt)[1]:
        # The request's LoRAs are merged into the weights for both passes.
        raise SdlabError("the hires prompt names other LoRAs than the prompt; sdlab uses the prompt's in both "
                         "passes: give the hires prompt the same <lora:...> tags")
    embeddings = pipe.embeddings_for(prompt_text, negative_text)
    hr_req = replace(req, prompt=prompt, negative_prompt=negative, steps=n, width=target.size[0],
                     height=target.size[1], sampler=sampler.name, schedule=schedule,
                     cfg_scale=req.cfg_scale if req.hr_cfg is None else req.hr_cfg, enable_hr=False)
    # ControlNet guides both passes, as the web UI's extension does, each with its map fitted to its size.
    controls = tuple(for_hires(unit, *target.size) for unit in run.controls if unit.hr_option != "Low res only")
    hr_run = passes.prepare(pipe, hr_req, prompt_text, negative_text, sampler, schedule, embeddings, controls)
    total = rules.schedule_steps(n, req.denoising_strength)
    if total:
        sigmas = get_sampler_sigmas(sampler, schedule, total, hr_run.base.model.sampling)[-(n + 1):]
        hr_run = replace(hr_run, sigmas=sigmas)
    return HiresRun(hr_run, target, mode, upscaler, len(hr_run.sigmas) - 1 if total else 0)


def upscalers_of(pipe: Pipeline) -> Upscalers:
    """The pipeline's image upscalers (its models folder's), made on first use."""
    from ..upscalers import Upscalers

    if getattr(pipe, "upscalers", None) is None:
        pipe.upscalers = Upscalers(pipe.models.root, device=pipe.bundle.device)
    return pipe.upscalers


def upscale_latent(x: Tensor, size: tuple[int, int], mode: tuple[str, bool]) -> Tensor:
    """The web UI's latent upscale: `interpolate` to (h, w) latent cells."""
    name, antialias = mode
    return torch.nn.functional.interpolate(x.float(), size=size, mode=name, antialias=antialias)


def resize_image(image: Image.Image, width: int, height: int, upscaler: str, upscalers: Upscalers) -> Image.Image:
    """The web UI's `images.resize_image(0, ...)` ("just resize"): the upscaler when the image
    grows, then LANCZOS to exactly `width` x `height`."""
    scale = max(width / image.width, height / image.height)
    if upscaler != "None" and scale > 1.0:
        image = upscalers.upscale(image, upscaler, scale)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return image


def shift_progress(callback: ProgressCallback | None, done: int, total: int) -> ProgressCallback | None:
    """A callback that reports a pass's steps as part of both passes: `done` steps before it,
    `total` in all (the web UI counts steps + hires steps per image)."""
    if callback is None:
        return None
    return lambda p: callback(replace(p, step=done + p.step, total=total))


def second_pass(pipe: Pipeline, hr: HiresRun, x: Tensor, seeds: list[int], subseeds: list[int], batch: int,
                callback: ProgressCallback | None, done: int = 0, first_noise: NoiseSource | None = None
                ) -> tuple[Tensor, tuple[int, int] | None]:
    """The hires pass on a batch's first-pass latent `x`: the final latent, and (steps done,
    steps to run) over both passes if the callback stopped it. `done`: the first pass's steps;
    `first_noise`: the first pass's noise source, whose generators go on to draw the VAE's
    sample of an upscaled image (the pass's own noise stays the seeds' first draw at the new
    size, as the web UI's; the web UI samples the VAE from torch's global generator)."""
    run, req = hr.run, hr.run.req
    bundle = pipe.bundle
    factor = bundle.config.vae.downsample_factor
    to_x, to_y = hr.target.upscale_to
    if hr.mode is not None:
        x = upscale_latent(x, (to_y // factor, to_x // factor), hr.mode)
    else:
        pixels = steps.decode(bundle.vae, x, bundle.family)
        # As the web UI: [0, 1], then 255x truncated to uint8 (not rounded).
        arr = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).mul(255.0).permute(0, 2, 3, 1).cpu().numpy()
        size = (to_x // factor * factor, to_y // factor * factor)
        images = [resize_image(Image.fromarray(a.astype(np.uint8)), *size, hr.upscaler, upscalers_of(pipe))
                  for a in arr]
        pixels = torch.cat([to_tensor(img) for img in images]).to(device=bundle.device,
                                                                   dtype=next(bundle.vae.parameters()).dtype)
        if first_noise is None:
            first_noise = PerImageNoise(run.latent_shape, seeds, req.rng)
        x = steps.encode_image(bundle.vae, pixels, bundle.family, first_noise)
    tx, ty = hr.target.truncate
    x = x[:, :, ty // 2:x.shape[2] - (ty + 1) // 2, tx // 2:x.shape[3] - (tx + 1) // 2]
    if hr.steps == 0:
        return x, None
    noise = PerImageNoise(run.latent_shape, seeds, req.rng, subseeds, req.subseed_strength)
    initial = noise.initial().to(device=x.device, dtype=torch.float32)
    sigmas = run.sigmas
    start = passes.Latents(initial, x, None, None)
    x = steps.noised(run.base.model.sampling, sigmas[0], initial, x)
    pass_list = passes.sampling_passes(run, sigmas, start)
    noise_sampler = noise.sampler_noise(x, sigmas, run.sampler.brownian_noise)
    x, stopped = passes.sample_passes(run, pass_list, x, noise_sampler, batch,
                                     shift_progress(callback, done, done + hr.steps))
    if stopped is not None:
        stopped = (done + stopped[0], done + stopped[1])
    return x, stopped
