"""The web UI's recipe: how AUTOMATIC1111's web UI turns one request into images, written over
the generation steps (`steps.py`, DESIGN.md "Generation as composable steps").

Its rules live here and nowhere else: per-image seeds and the n_iter loop (for every face),
prompt editing turned into sigma ranges, img2img's `int(steps * strength)` steps, the "only
masked" crop and the paste-back, the SDXL refiner as a second sampling pass. No step it calls
knows which face asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from .. import steps
from ..images import blur_mask, latent_preview, mask_to_tensor, masked_bbox, to_pil, to_tensor
from ..model import SizeConditioning, UNetModel, unet_model
from ..request import GenerationRequest, Interrupted, Progress
from ..sampling.denoiser import CFGDenoiser
from ..sampling.noise import NoiseSource, PerImageNoise
from ..sampling.patches import Denoiser, by_sigma, inpaint_mask
from ..sampling.samplers import SamplerInfo, get_sampler_sigmas
from ..text.conditioning import PromptSchedule, prompt_schedule

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = ["Batch", "Run", "batch_seeds", "batches", "prepare"]

ProgressCallback = Callable[[Progress], None]


def batch_seeds(req: GenerationRequest, batch: int) -> tuple[list[int], list[int]]:
    """The seeds and variation seeds of batch `batch` (0-based) of a request: image i of batch
    b has seed + b * batch_size + i, as the web UI numbers them across its batch count."""
    first = batch * req.batch_size
    return ([req.seed + first + i for i in range(req.batch_size)],
            [req.subseed + first + i for i in range(req.batch_size)])


@dataclass(frozen=True)
class Region:
    """What is generated: the init image and mask at the generation size (the padded box around
    the mask for "only masked"), and that box in the original image."""

    init_image: Image.Image | None
    mask: Image.Image | None  # "L", white = repaint
    crop: tuple[int, int, int, int] | None


def region(req: GenerationRequest) -> Region:
    init_image, mask, crop = req.init_image, req.mask, None
    if mask is not None:
        mask = mask.convert("L")
        if req.inpainting_mask_invert:
            mask = Image.eval(mask, lambda v: 255 - v)
        if req.inpaint_full_res:
            crop = masked_bbox(mask, req.inpaint_full_res_padding, req.width, req.height)
            init_image, mask = init_image.crop(crop), mask.crop(crop)
    size = (req.width, req.height)
    if init_image is not None:
        init_image = init_image.convert("RGB")
        init_image = init_image if init_image.size == size else init_image.resize(size, Image.LANCZOS)
        if mask is not None and mask.size != size:
            mask = mask.resize(size, Image.LANCZOS)
    return Region(init_image, mask, crop)


@dataclass(frozen=True)
class Stage:
    """One model's share of the sampling: its adapter and its prompts' schedules."""

    model: UNetModel
    prompts: tuple[PromptSchedule, PromptSchedule]  # positive, negative


@dataclass(frozen=True)
class Run:
    """One request made ready: what every batch of it shares."""

    req: GenerationRequest
    sampler: SamplerInfo
    schedule: str  # the schedule's name, "automatic" resolved
    sigmas: Tensor  # the whole schedule the sampler walks (img2img walks its tail)
    base: Stage
    refiner: Stage | None
    sizes: SizeConditioning
    region: Region
    latent_shape: tuple[int, int, int]


def prepare(pipe: Pipeline, req: GenerationRequest, prompt: str, negative: str, sampler: SamplerInfo,
            schedule: str, embeddings: Sequence[Sequence[dict]]) -> Run:
    """Encode the prompts (with each model's own encoders and embeddings) and make the sigmas."""
    ztsnr = pipe.zero_terminal_snr(req)
    base = unet_model(pipe.bundle, ztsnr)
    sigmas = get_sampler_sigmas(sampler, schedule, req.steps, base.sampling)
    stages = [Stage(unet_model(bundle, ztsnr),
                    tuple(prompt_schedule(runners, [prompt, negative], req.steps, req.clip_skip, encoder_embeddings,
                                          combine=bundle.family.text_combine)))
              for bundle, runners, encoder_embeddings in pipe.models_in_use(req, embeddings)]
    sizes = SizeConditioning(req.original_size or (req.height, req.width), req.crop_top_left,
                             req.target_size or (req.height, req.width), req.aesthetic_score,
                             req.negative_aesthetic_score)
    config = pipe.bundle.config
    factor = config.vae.downsample_factor
    shape = (config.vae.latent_channels, req.height // factor, req.width // factor)
    return Run(req, sampler, schedule, sigmas, stages[0], stages[1] if len(stages) > 1 else None, sizes,
               region(req), shape)


@dataclass
class Batch:
    """The images of one batch; `stopped`: (steps done, steps to run) if it was stopped early."""

    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    stopped: tuple[int, int] | None = None


def batches(pipe: Pipeline, run: Run, callback: ProgressCallback | None) -> Iterator[Batch]:
    """The request's batches, one at a time (`n_iter` of them). A batch stopped by the callback
    (`Interrupted`) comes back with what it has, or with no images if it had not finished a
    step; the caller decides whether to go on (the web UI's "skip") or stop."""
    for batch in range(run.req.n_iter):
        seeds, subseeds = batch_seeds(run.req, batch)
        try:
            images, stopped = generate_batch(pipe, run, seeds, subseeds, batch, callback)
        except Interrupted:
            yield Batch([], seeds, subseeds, (0, 1))
            continue
        yield Batch(images, seeds, subseeds, stopped)


@dataclass(frozen=True)
class Latents:
    """A batch's starting point, drawn in diffusers' order (image latent, initial noise,
    masked-image latent) so the same seed gives the same image as its pipelines."""

    initial_noise: Tensor  # (B, C, h, w) on the device
    init: Tensor | None  # the init image's latent (img2img, inpaint)
    concat: Tensor | None  # inpainting models' extra channels: mask, masked-image latent
    mask: Tensor | None  # latent-size mask (1 = repaint) for ordinary models


def latents(pipe: Pipeline, run: Run, noise: NoiseSource) -> Latents:
    req, bundle, region = run.req, pipe.bundle, run.region
    device, vae_dtype = bundle.device, next(bundle.vae.parameters()).dtype
    inpaint_model = bundle.config.unet.in_channels == 9
    init = concat = latent_mask = pixels = None
    if region.init_image is not None:
        pixels = to_tensor(region.init_image).to(device=device, dtype=vae_dtype)
        # 9-channel models at full strength start from pure noise: the image enters only
        # through the masked-image channels.
        if not (inpaint_model and region.mask is not None and req.denoising_strength >= 1.0):
            init = steps.encode_image(bundle.vae, pixels, bundle.family, noise)
    initial = noise.initial().to(device=device, dtype=torch.float32)
    if region.mask is not None:
        mask = mask_to_tensor(region.mask).to(device)
        if inpaint_model:
            mask = (mask >= 0.5).float()
            masked = steps.encode_image(bundle.vae, pixels * (mask < 0.5).to(pixels.dtype), bundle.family, noise)
            small = torch.nn.functional.interpolate(mask, size=run.latent_shape[1:])
            concat = torch.cat([small, masked], dim=1).expand(req.batch_size, -1, -1, -1)
        else:
            latent_mask = torch.nn.functional.interpolate(mask, size=run.latent_shape[1:])
    return Latents(initial, init, concat, latent_mask)


@torch.no_grad()
def generate_batch(pipe: Pipeline, run: Run, seeds: list[int], subseeds: list[int], batch: int,
                   callback: ProgressCallback | None) -> tuple[list[Image.Image], tuple[int, int] | None]:
    """One batch's images, and (steps done, steps to run) if the callback stopped it part-way."""
    req = run.req
    noise = PerImageNoise(run.latent_shape, seeds, req.rng, subseeds, req.subseed_strength)
    start = latents(pipe, run, noise)
    sigmas = run.sigmas
    if start.init is not None:
        # Denoising strength: steps x strength sampler steps, from the matching sigma.
        t_enc = int(req.steps * req.denoising_strength)
        if t_enc == 0:
            return finish(pipe, run, start.init.expand(req.batch_size, -1, -1, -1)), None
        sigmas = sigmas[-(t_enc + 1):]
    x = steps.noised(run.base.model.sampling, sigmas[0], start.initial_noise, start.init)
    passes = sampling_passes(run, sigmas, start)
    noise_sampler = noise.sampler_noise(x, sigmas, run.sampler.brownian_noise)
    x, stopped = sample_passes(run, passes, x, noise_sampler, batch, callback)
    if start.mask is not None:
        x = start.init.float() * (1 - start.mask) + x * start.mask
    return finish(pipe, run, x), stopped


def sampling_passes(run: Run, sigmas: Tensor, start: Latents) -> list[tuple[UNetModel, Denoiser, Tensor]]:
    """(model, guided denoiser, sigmas) of each pass: the base model's, then with a refiner the
    refiner's from the switch on (a second pass, as diffusers' denoising_end/start runs it)."""
    req = run.req
    total = len(sigmas) - 1
    offset = req.steps - total  # img2img starts part-way; prompt editing counts requested steps
    stages = [(run.base, sigmas)]
    if run.refiner is not None:
        switch = min(max(int(req.steps * req.refiner_switch_at) - offset, 0), total)
        stages = [(run.base, sigmas[:switch + 1]), (run.refiner, sigmas[switch:])]
        stages = [(stage, part) for stage, part in stages if len(part) > 1]
    passes = []
    for stage, part in stages:
        guide = guided(stage, run, start.concat, sigmas, offset)
        if start.mask is not None:
            # Ordinary models inpaint by keeping the original outside the mask at every step.
            guide = inpaint_mask(guide, start.init, start.mask)
        passes.append((stage.model, guide, part))
    return passes


def guided(stage: Stage, run: Run, concat: Tensor | None, sigmas: Tensor, offset: int) -> Denoiser:
    """Classifier-free guidance over the stage's prompts, one denoiser per stretch of steps in
    which prompt editing keeps both prompts the same. Entry `(end, prompt)` of a schedule applies
    up to sampler step `end` (as the web UI counts steps: `offset` earlier for img2img), which is
    while sigma is above the sigma of the step after it."""
    req, model = run.req, stage.model
    positive, negative = stage.prompts
    parts: list[tuple[float, CFGDenoiser, tuple]] = []
    for end in sorted({end for end, _ in positive.entries + negative.entries}):
        pair = (positive.at(end), negative.at(end))
        until = _sigma_after(sigmas, end - offset)
        if parts and parts[-1][2] == pair:
            parts[-1] = (until, parts[-1][1], pair)
            continue
        cond = model.conditioning(pair[0], req.batch_size, run.sizes, False, concat)
        uncond = model.conditioning(pair[1], req.batch_size, run.sizes, True, concat) if req.cfg_scale != 1.0 else None
        parts.append((until, CFGDenoiser(model, cond, uncond, req.cfg_scale, req.guidance_rescale), pair))
    return by_sigma([(until, cfg) for until, cfg, _ in parts])


def _sigma_after(sigmas: Tensor, last_step: int) -> float:
    """The bound below which a stretch that ends at sampler step `last_step` no longer applies."""
    if last_step + 1 >= len(sigmas):
        return float("-inf")
    if last_step < 0:
        return float("inf")
    return float(sigmas[last_step + 1])


def sample_passes(run: Run, passes: list[tuple[UNetModel, Denoiser, Tensor]], x: Tensor, noise_sampler,
                  batch: int, callback: ProgressCallback | None) -> tuple[Tensor, tuple[int, int] | None]:
    """Run the passes one after the other with progress reports; a callback that raises
    `Interrupted` stops them and the last denoised estimate is the result."""
    total = sum(len(part) - 1 for _, _, part in passes)
    progress = {"step": 0, "x0": x}

    def report(done: int) -> Callable:
        def on_step(i: int, n: int, x_t: Tensor, denoised: Tensor) -> None:
            progress["step"], progress["x0"] = done + i + 1, denoised
            if callback is not None:
                callback(Progress(done + i + 1, total, batch, run.req.n_iter, denoised,
                                  lambda d=denoised: latent_preview(d)))
        return on_step

    try:
        for model, guide, part in passes:
            x = steps.sample(model.sampling, guide, x, part, run.sampler, noise_sampler, eta=run.req.eta,
                             callback=report(progress["step"]))
    except Interrupted:
        if progress["step"] == 0:
            raise
        return progress["x0"], (progress["step"], total)
    return x, None


def finish(pipe: Pipeline, run: Run, x: Tensor) -> list[Image.Image]:
    """Decode, then for inpainting paste the result over the original with the (blurred) mask as
    alpha, so the pixels outside the mask come back unchanged."""
    bundle, req, region = pipe.bundle, run.req, run.region
    images = to_pil(steps.decode(bundle.vae, x, bundle.family))
    if region.mask is None:
        return images
    alpha = blur_mask(region.mask, req.mask_blur)
    original = req.init_image.convert("RGB")
    out = []
    for img in images:
        if region.crop is not None:
            crop = region.crop
            img = img.resize((crop[2] - crop[0], crop[3] - crop[1]), Image.LANCZOS)
            full = original.copy()
            full.paste(Image.composite(img, original.crop(crop), alpha.resize(img.size, Image.LANCZOS)), crop[:2])
            out.append(full)
        else:
            base = original if original.size == img.size else original.resize(img.size, Image.LANCZOS)
            out.append(Image.composite(img, base, alpha))
    return out
