"""The passes of the web UI's recipe: a request made ready (`prepare` -> `Run`: prompts encoded
with each model's encoders, sigmas, the region to generate, ControlNet units), and the sampling
passes over it (the base model, then the refiner; each a guided, patched denoiser sampled over its
share of the sigmas). `webui` runs them per batch; the hires fix runs them again at its size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from PIL import Image
from torch import Tensor

from .. import steps
from ..errors import SdlabError
from ..controlnet.apply import ControlUnit, controlled
from ..images import latent_preview, masked_bbox
from ..model import MMDiTModel, SizeConditioning, UNetModel, model_for
from ..request import GenerationRequest, Interrupted, Progress
from ..resize import resize_image
from ..sampling.denoiser import CFGDenoiser
from ..sampling.patches import Denoiser, by_sigma, inpaint_mask, skip_layer_guidance, slg_window
from ..sampling.samplers import SamplerInfo, get_sampler_sigmas
from ..text.conditioning import PromptSchedule, prompt_schedule

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = ["Latents", "Region", "Run", "Stage", "guided", "prepare", "region", "sample_passes", "sampling_passes"]

ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Region:
    """What is generated: the init image and mask at the generation size (the padded box around
    the mask for "only masked"), and that box in the original image."""

    init_image: Image.Image | None  # at its own size for resize mode 3 (its latent is resized)
    mask: Image.Image | None  # "L", white = repaint
    crop: tuple[int, int, int, int] | None
    latent_mask: Image.Image | None = None  # where the latent is repainted, if not `mask`


def region(req: GenerationRequest) -> Region:
    init_image, mask, crop, latent_mask = req.init_image, req.mask, None, req.latent_mask
    if mask is not None:
        mask = mask.convert("L")
        latent_mask = latent_mask.convert("L") if latent_mask is not None else None
        if req.inpainting_mask_invert:
            mask = Image.eval(mask, lambda v: 255 - v)
            latent_mask = Image.eval(latent_mask, lambda v: 255 - v) if latent_mask is not None else None
        if req.inpaint_full_res:
            crop = masked_bbox(mask, req.inpaint_full_res_padding, req.width, req.height)
            init_image, mask = init_image.crop(crop), mask.crop(crop)
            latent_mask = latent_mask.crop(crop) if latent_mask is not None else None
    size = (req.width, req.height)
    if init_image is not None:
        init_image = init_image.convert("RGB")
        # The web UI's resize modes (resize.py); the "only masked" crop is stretched, as it has the
        # generation's aspect ratio already (masked_bbox).
        mode = 0 if crop is not None else req.resize_mode
        init_image = init_image if init_image.size == size else resize_image(mode, init_image, *size)
        if mask is not None and mask.size != size:
            mask = resize_image(mode, mask, *size)
        if latent_mask is not None and latent_mask.size != size:
            latent_mask = resize_image(mode, latent_mask, *size)
    return Region(init_image, mask, crop, latent_mask)


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
    controls: tuple[ControlUnit, ...] = ()  # ControlNet units, on the base model's pass


def prepare(pipe: Pipeline, req: GenerationRequest, prompt: str, negative: str, sampler: SamplerInfo,
            schedule: str, embeddings: Sequence[Sequence[dict]], controls: Sequence[ControlUnit] = ()) -> Run:
    """Encode the prompts (with each model's own encoders and embeddings) and make the sigmas."""
    ztsnr = pipe.zero_terminal_snr(req)
    base = model_for(pipe.bundle, ztsnr, req.shift)
    sigmas = get_sampler_sigmas(sampler, schedule, req.steps, base.sampling)
    stages = [Stage(base if bundle is pipe.bundle else model_for(bundle, ztsnr, req.shift),
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
               region(req), shape, tuple(controls))


@dataclass(frozen=True)
class Latents:
    """A batch's starting point, drawn in diffusers' order (image latent, initial noise,
    masked-image latent) so the same seed gives the same image as its pipelines."""

    initial_noise: Tensor  # (B, C, h, w) on the device
    init: Tensor | None  # the init image's latent (img2img, inpaint)
    concat: Tensor | None  # inpainting models' extra channels: mask, masked-image latent
    mask: Tensor | None  # latent-size mask (1 = repaint) for ordinary models


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
        if stage is run.base and run.controls:  # scheduled over the whole walk, as steps count
            stage = replace(stage, model=controlled(stage.model, run.controls, sigmas))
        guide = with_slg(guided(stage, run, start.concat, sigmas, offset), stage, run, sigmas, offset)
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


def with_slg(guide: Denoiser, stage: Stage, run: Run, sigmas: Tensor, offset: int) -> Denoiser:
    """`guide` with skip-layer guidance when the request asks for it (`slg_layers`), as diffusers'
    `StableDiffusion3Pipeline` runs it (`skip_guidance_layers`, steps `steps * start < i < steps *
    end`), which the SD3.5 reference shares; ComfyUI's node uses a sigma window and other defaults."""
    req, model = run.req, stage.model
    if not req.slg_layers:
        return guide
    if not isinstance(model, MMDiTModel):
        raise SdlabError("skip-layer guidance (--slg-layers) works on SD3 / SD3.5 models only")
    depth = model.net.cfg.depth
    bad = [i for i in req.slg_layers if not 0 <= i < depth]
    if bad:
        raise SdlabError(f"--slg-layers {bad} are not layers of this {depth}-layer MMDiT (0..{depth - 1})")
    if req.cfg_scale == 1.0:
        return guide  # as diffusers: SLG goes with classifier-free guidance
    skipped = MMDiTModel(model.net, model.config, model.sampling, model.device, model.compute_dtype,
                         skip_layers=tuple(req.slg_layers))
    conds, skips = [], []
    for end, encoded in stage.prompts[0].entries:
        c = model.conditioning(encoded, req.batch_size)
        until = _sigma_after(sigmas, end - offset)
        conds.append((until, lambda x, s, c=c: model(x, s, c)))
        skips.append((until, lambda x, s, c=c: skipped(x, s, c)))
    lower, upper = slg_window(sigmas, req.slg_start, req.slg_end, req.steps, offset)
    return skip_layer_guidance(guide, by_sigma(conds), by_sigma(skips), req.slg_scale, lower, upper)
