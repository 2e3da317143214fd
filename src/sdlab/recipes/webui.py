"""The web UI's recipe: how AUTOMATIC1111's web UI turns one request into images, written over
the generation steps (`steps.py`, DESIGN.md "Generation as composable steps").

Its rules live here and nowhere else: per-image seeds and the n_iter loop (for every face),
prompt editing turned into sigma ranges, img2img's `int(steps * strength)` steps, the "only
masked" crop and the paste-back, the SDXL refiner as a second sampling pass. No step it calls
knows which face asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from .. import steps
from . import hires
from .passes import Latents, Run, prepare, sample_passes, sampling_passes
from ..images import blur_mask, mask_to_tensor, to_pil, to_tensor
from ..request import GenerationRequest, Interrupted, Progress
from ..resize import resize_latent
from ..sampling.noise import NoiseSource, PerImageNoise

if TYPE_CHECKING:
    from ..pipeline import Pipeline

__all__ = ["Batch", "Run", "batch_seeds", "batches", "generate_batch", "prepare"]

ProgressCallback = Callable[[Progress], None]


def batch_seeds(req: GenerationRequest, batch: int) -> tuple[list[int], list[int]]:
    """The seeds and variation seeds of batch `batch` (0-based) of a request: image i of batch
    b has seed + b * batch_size + i, as the web UI numbers them across its batch count."""
    first = batch * req.batch_size
    return ([req.seed + first + i for i in range(req.batch_size)],
            [req.subseed + first + i for i in range(req.batch_size)])


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
    # The hires fix's second pass (txt2img), made ready once for all batches.
    hr = hires.prepare(pipe, run) if run.req.enable_hr and run.req.init_image is None else None
    for batch in range(run.req.n_iter):
        seeds, subseeds = batch_seeds(run.req, batch)
        try:
            images, stopped = generate_batch(pipe, run, seeds, subseeds, batch, callback, hr)
        except Interrupted:
            yield Batch([], seeds, subseeds, (0, 1))
            continue
        yield Batch(images, seeds, subseeds, stopped)


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
            # resize mode 3: the image was encoded at its own size (`passes.region`)
            init = resize_latent(init, run.latent_shape[1:])
    initial = noise.initial().to(device=device, dtype=torch.float32)
    if region.mask is not None:
        mask = mask_to_tensor(region.mask).to(device)
        if inpaint_model:
            mask = (mask >= 0.5).float()
            masked = steps.encode_image(bundle.vae, pixels * (mask < 0.5).to(pixels.dtype), bundle.family, noise)
            small = torch.nn.functional.interpolate(mask, size=run.latent_shape[1:])
            concat = torch.cat([small, masked], dim=1).expand(req.batch_size, -1, -1, -1)
        else:
            if region.latent_mask is not None:  # the web UI's separate latent mask (its outpainting scripts)
                mask = mask_to_tensor(region.latent_mask).to(device)
            latent_mask = torch.nn.functional.interpolate(mask, size=run.latent_shape[1:])
    return Latents(initial, init, concat, latent_mask)


@torch.no_grad()
def generate_batch(pipe: Pipeline, run: Run, seeds: list[int], subseeds: list[int], batch: int,
                   callback: ProgressCallback | None, hr: hires.HiresRun | None = None
                   ) -> tuple[list[Image.Image], tuple[int, int] | None]:
    """One batch's images, and (steps done, steps to run) if the callback stopped it part-way.
    With `hr` (the hires fix) the first pass's latent goes through its second pass."""
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
    first = len(sigmas) - 1
    x, stopped = sample_passes(run, passes, x, noise_sampler, batch,
                               callback if hr is None else hires.shift_progress(callback, 0, first + hr.steps))
    if start.mask is not None:
        x = start.init.float() * (1 - start.mask) + x * start.mask
    if hr is not None and stopped is None:
        x, stopped = hires.second_pass(pipe, hr, x, seeds, subseeds, batch, callback, done=first,
                                       first_noise=noise)
    return finish(pipe, run, x), stopped


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
        else:  # the init image as it was fitted to the size (its resize mode)
            out.append(Image.composite(img, region.init_image, alpha))
    return out
