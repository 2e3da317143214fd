"""txt2img, img2img and inpainting on a loaded Bundle.

Every face of sdlab (Python, CLI, HTTP, web page) builds one `GenerationRequest`
and calls `Pipeline.generate`; none holds generation logic of its own.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from ._version import __version__
from .checkpoints.loader import Bundle
from .device import dtype_name, vae_dtype
from .errors import SdlabError
from .embeddings import EmbeddingLibrary
from .families import ModelConfig
from .images import blur_mask, latent_preview, mask_to_tensor, masked_bbox, to_pil, to_tensor
from .infotext import create_infotext, with_infotext
from .lora import LoraState, lora_specs
from .models.layers import circular_padding
from .models.storage import storage_dtype
from .models.unet import sdxl_size_embedding
from .models_dir import ModelsDir
from .perf import decode_latents, encode_images
from .sampling.denoiser import CFGDenoiser, Conditioning, DiscreteDenoiser
from .sampling.rng import ImageRNG, RngSource
from .sampling.samplers import brownian_tree_noise_sampler, get_sampler_sigmas, resolve_sampler
from .sampling.schedules import SCHEDULES, DiscreteSchedule, discrete_schedule, resolve_schedule
from .text.conditioning import TextEncoderRunner, prompt_schedule
from .styles import STYLES_FILE, apply_styles
from .text.prompt import extract_extra_networks

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1


@dataclass
class GenerationRequest:
    """One request, as the web UIs' API fields name its parts (A1111 names in comments)."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None  # None: the family's default size
    height: int | None = None
    steps: int = 20
    sampler: str = "Euler a"  # sampler_name
    schedule: str = "automatic"  # scheduler
    cfg_scale: float = 7.0
    seed: int = -1  # -1: random
    subseed: int = -1  # variation seed
    subseed_strength: float = 0.0
    batch_size: int = 1
    n_iter: int = 1  # batch count
    clip_skip: int = 1
    guidance_rescale: float = 0.0
    rng: RngSource = "cpu"
    eta: float | None = None
    # The noise schedule rescaled to zero terminal SNR (the web UI's "Noise schedule for
    # sampling"); None: as the model says (its file's `ztsnr` marker, Family.zero_terminal_snr).
    zero_terminal_snr: bool | None = None
    # img2img / inpaint
    init_image: Image.Image | None = None
    denoising_strength: float = 0.75
    mask: Image.Image | None = None  # white = repaint
    mask_blur: float = 4
    inpaint_full_res: bool = False  # "only masked"
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    # SDXL size conditioning, (height, width); None: the generation size. The refiner's
    # aesthetic scores (diffusers' defaults).
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # SDXL refiner: the fraction of the steps after which the refiner takes over (with a
    # refiner loaded in the pipeline); its name is only recorded in the infotext.
    refiner_switch_at: float | None = 0.8
    refiner_checkpoint: str | None = None
    # Saved prompt styles by name, merged into the prompts from the pipeline's styles.csv
    # (`styles.apply_styles`), in this order.
    styles: list[str] = field(default_factory=list)
    # Seamless images: the UNet and VAE pad their convolutions circularly (the web UI's "Tiling").
    tiling: bool = False

    @property
    def mode(self) -> Literal["txt2img", "img2img", "inpaint"]:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"


@dataclass
class Progress:
    step: int  # steps done in the current batch
    total: int
    batch: int  # index of the current batch (0 .. n_iter-1)
    batches: int
    latents: Tensor  # current denoised estimate
    preview: Callable[[], Image.Image | None] = field(repr=False, default=lambda: None)


class Interrupted(Exception):
    """Raised by a progress callback to stop generation; the images so far are returned."""


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    request: GenerationRequest
    interrupted: bool = False


def check_request(req: GenerationRequest, models: ModelsDir | None = None) -> None:
    """Every check of a request that needs no model (`validate` runs them too): the CLI runs
    them before it loads one, so a typo costs no load. With `models`, the prompt's LoRA tags
    must name files in that folder. Errors are one line that says what to change."""
    for name, v in (("width", req.width), ("height", req.height)):
        if v and (v < 8 or v % 8):  # None or 0: the default size
            raise SdlabError(f"{name} {v} is not a positive multiple of 8; try {max(8, v // 8 * 8)}")
    if req.steps < 1:
        raise SdlabError(f"steps must be at least 1, got {req.steps}")
    if req.batch_size < 1 or req.n_iter < 1:
        raise SdlabError("batch size and batch count must be at least 1")
    if not 0.0 <= req.denoising_strength <= 1.0:
        raise SdlabError(f"denoising strength must be between 0 and 1, got {req.denoising_strength}")
    if req.cfg_scale < 0:
        raise SdlabError(f"CFG scale must not be negative, got {req.cfg_scale}")
    if req.rng not in ("cpu", "nv"):
        raise SdlabError(f"unknown RNG source {req.rng!r}; choose cpu or nv")
    if req.refiner_switch_at is not None and not 0.0 <= req.refiner_switch_at <= 1.0:
        raise SdlabError(f"refiner switch must be between 0 and 1, got {req.refiner_switch_at}")
    if req.clip_skip < 1:
        raise SdlabError(f"clip skip must be at least 1, got {req.clip_skip}")
    if req.mask is not None and req.init_image is None:
        raise SdlabError("a mask needs an init image to inpaint")
    resolve_sampler(req.sampler)
    resolve_schedule(req.schedule)
    if models is not None:
        lora_specs(extract_extra_networks(req.prompt)[1], models.resolve_lora)


def validate(req: GenerationRequest, default_size: int) -> GenerationRequest:
    """Check a request (`check_request`); fill defaults. A mask of another size than the init
    image is resized to it, as the web UI does (clients and painting tools draw masks at
    another scale)."""
    check_request(req)
    if req.init_image is not None and not (req.width and req.height):
        # img2img / inpaint default to the init image's own size (rounded down to 8).
        default_w, default_h = (max(8, v // 8 * 8) for v in req.init_image.size)
    else:
        default_w = default_h = default_size
    width, height = req.width or default_w, req.height or default_h
    mask = req.mask
    if mask is not None and mask.size != req.init_image.size:
        mask = mask.convert("L").resize(req.init_image.size, Image.LANCZOS)
    seed = random.randrange(MAX_SEED) if req.seed is None or req.seed < 0 else int(req.seed)
    subseed = random.randrange(MAX_SEED) if req.subseed is None or req.subseed < 0 else int(req.subseed)
    return replace(req, width=width, height=height, seed=seed, subseed=subseed, mask=mask)


def _wxh(hw: tuple[int, int]) -> str:
    """(height, width) or (top, left) as the CLI writes it: WxH, LEFTxTOP."""
    return f"{hw[1]}x{hw[0]}"


def text_runners(bundle: Bundle) -> list[TextEncoderRunner]:
    fam = bundle.family
    return [TextEncoderRunner(te, tok, base_skip=fam.clip_skip, final_norm=fam.text_final_norm)
            for te, tok in zip(bundle.text_encoders, bundle.tokenizers)]


def added_conditioning(config: ModelConfig, pooled: Tensor, req: GenerationRequest, negative: bool) -> Tensor | None:
    """SDXL's vector conditioning y: the pooled text embedding followed by the embedded
    size numbers (original size, crop top-left, then the target size for the base model
    or the aesthetic score for the refiner), all (height, width) as diffusers orders them,
    each embedded as wide as the model's UNet says (`UNetConfig.size_embed_dim`)."""
    family = config.family
    if family.added_conditioning is None:
        return None
    original = req.original_size or (req.height, req.width)
    if family.added_conditioning == "sdxl":
        numbers = [*original, *req.crop_top_left, *(req.target_size or (req.height, req.width))]
    else:
        numbers = [*original, *req.crop_top_left, req.negative_aesthetic_score if negative else req.aesthetic_score]
    size = sdxl_size_embedding(torch.tensor([numbers], dtype=torch.float32), config.unet.size_embed_dim)
    return torch.cat([pooled.float().cpu(), size], dim=-1)


class Pipeline:
    """Generation on one loaded model. Keep it around: the model stays loaded and the
    conditioning of an unchanged prompt is cached between requests."""

    def __init__(self, bundle: Bundle, refiner: Bundle | None = None, models: ModelsDir | None = None,
                 styles_file: str | Path | None = None):
        self.bundle = bundle
        fam = bundle.family
        self.schedules = {ztsnr: discrete_schedule(fam.beta_start, fam.beta_end, zero_terminal_snr=ztsnr)
                          for ztsnr in (False, True)}
        self.text = text_runners(bundle)
        self.refiner = refiner
        self.refiner_text = text_runners(refiner) if refiner is not None else []
        # LoRAs and embeddings are found by name in the models folder (web UI layout).
        self.models = models if models is not None else ModelsDir()
        self.loras = LoraState()
        self.embeddings = EmbeddingLibrary(self.models.folder("embedding"))
        self.vae_info: dict[str, str] = {}  # "VAE hash" / "VAE" of a separate VAE file, for the infotext
        # The styles a request names (the web UI's styles.csv); read at each request that names one.
        self.styles_file = Path(styles_file) if styles_file is not None else self.models.root / STYLES_FILE

    def zero_terminal_snr(self, req: GenerationRequest) -> bool:
        """Whether `req` samples on the zero-terminal-SNR schedule."""
        return self.bundle.family.zero_terminal_snr if req.zero_terminal_snr is None else req.zero_terminal_snr

    def set_refiner(self, refiner: Bundle | None) -> None:
        """Use (or stop using) an SDXL refiner for the last part of the steps."""
        self.refiner = refiner
        self.refiner_text = text_runners(refiner) if refiner is not None else []

    # -- the Python API --------------------------------------------------

    def txt2img(self, prompt: str, **params) -> list[Image.Image]:
        return self.generate(GenerationRequest(prompt=prompt, **params)).images

    def img2img(self, init_image: Image.Image, prompt: str, **params) -> list[Image.Image]:
        return self.generate(GenerationRequest(prompt=prompt, init_image=init_image, **params)).images

    def inpaint(self, init_image: Image.Image, mask: Image.Image, prompt: str, **params) -> list[Image.Image]:
        params.setdefault("denoising_strength", 1.0)
        return self.generate(GenerationRequest(prompt=prompt, init_image=init_image, mask=mask, **params)).images

    # -- the one generation path ------------------------------------------

    def generate(self, req: GenerationRequest, callback: Callable[[Progress], None] | None = None) -> GenerationResult:
        req = apply_styles(validate(req, self.bundle.family.default_size), self.styles_file)
        prompt, networks = extract_extra_networks(req.prompt)
        negative, _ = extract_extra_networks(req.negative_prompt)  # the web UIs apply only the prompt's
        specs = lora_specs(networks, self.models.resolve_lora)
        embeddings = self._embeddings(prompt, negative)
        # Merged into the weights (and restored exactly when a later request drops them).
        self.loras.set(self.bundle, specs)
        for runner in self.text:
            runner.weights_version = self.loras.te_version
        extras = self._extra_infotext(specs, prompt + " " + negative)
        sampler = resolve_sampler(req.sampler)
        schedule_name = resolve_schedule(req.schedule).name
        if schedule_name == "automatic":
            schedule_name = sampler.default_schedule or "automatic"

        tiled = (self.bundle.unet, self.bundle.vae, *((self.refiner.unet,) if self.refiner is not None else ()))
        with circular_padding(*tiled, enabled=req.tiling):
            images, infotexts, seeds, subseeds, interrupted = self._generate_batches(
                req, prompt, negative, embeddings, sampler, schedule_name, extras, callback)
        return GenerationResult(images, infotexts, seeds, subseeds, req, interrupted)

    def _generate_batches(self, req: GenerationRequest, prompt: str, negative: str, embeddings: list[dict], sampler,
                          schedule_name: str, extras: dict[str, str],
                          callback: Callable[[Progress], None] | None) -> tuple[list, list, list, list, bool]:
        images, infotexts, seeds, subseeds = [], [], [], []
        interrupted = False
        for batch in range(req.n_iter):
            first = req.seed + batch * req.batch_size
            batch_seeds = [first + i for i in range(req.batch_size)]
            batch_subseeds = [req.subseed + batch * req.batch_size + i for i in range(req.batch_size)]
            try:
                out, stopped = self._generate_batch(req, prompt, negative, embeddings, sampler, schedule_name,
                                                    batch_seeds, batch_subseeds, batch, callback)
            except Interrupted:  # stopped before its first step finished: nothing to show for this batch
                interrupted = True
                break
            interrupted = stopped is not None
            for i, img in enumerate(out):
                info = self.infotext(req, sampler.name, schedule_name, batch_seeds[i], batch_subseeds[i], extras,
                                     position=i, stopped=stopped)
                images.append(with_infotext(img, info))  # `image.save("out.png")` keeps the infotext
                infotexts.append(info)
            seeds += batch_seeds
            subseeds += batch_subseeds
            if interrupted:
                break
        return images, infotexts, seeds, subseeds, interrupted

    def infotext(self, req: GenerationRequest, sampler: str, schedule: str, seed: int, subseed: int,
                 extras: dict[str, str] | None = None, position: int = 0,
                 stopped: tuple[int, int] | None = None) -> str:
        """The web UI's infotext of one image (`position` in its batch), then sdlab's own keys
        for what else decides its pixels (`replay_infotext`). `stopped`: (steps done, steps the
        sampler had to run) of an image interrupted before its last step."""
        params: dict[str, object] = {
            "Steps": req.steps, "Sampler": sampler, "Schedule type": SCHEDULES[schedule].label,
            "CFG scale": req.cfg_scale, "Seed": seed, "Size": f"{req.width}x{req.height}",
            "Model hash": self.bundle.short_hash, "Model": self.bundle.name, **self.vae_info,
        }
        if req.subseed_strength:
            params["Variation seed"] = subseed
            params["Variation seed strength"] = req.subseed_strength
        if req.mode != "txt2img":
            params["Denoising strength"] = req.denoising_strength
        if req.clip_skip > 1:
            params["Clip skip"] = req.clip_skip
        params["RNG"] = "NV" if req.rng == "nv" else "CPU"
        if req.tiling:
            params["Tiling"] = "True"  # the web UI's key and value
        if req.guidance_rescale:
            params["CFG rescale phi"] = req.guidance_rescale
        default_eta = resolve_sampler(sampler).default_eta
        if req.eta is not None and default_eta is not None and req.eta != default_eta:
            params["Eta DDIM" if sampler == "DDIM" else "Eta"] = req.eta  # the web UI's keys
        if self.zero_terminal_snr(req):
            params["Noise Schedule"] = "Zero Terminal SNR"
        if req.mode == "inpaint":
            params["Mask blur"] = req.mask_blur
            if req.inpaint_full_res:
                params["Inpaint area"] = "Only masked"
                params["Masked area padding"] = req.inpaint_full_res_padding
        params.update(extras or {})
        if self.refiner is not None and req.refiner_switch_at is not None and req.refiner_switch_at < 1.0:
            params["Refiner"] = req.refiner_checkpoint or self.refiner.name
            params["Refiner switch at"] = req.refiner_switch_at
        params.update(self.replay_infotext(req, position))
        if stopped is not None and stopped[0] < stopped[1]:  # stopped at the last step: nothing is missing
            # Steps still names the schedule the image was sampled on; this says it stopped part-way
            # (the web UI writes nothing, and its unfinished images pass for finished ones).
            params["Interrupted at step"] = f"{stopped[0]}/{stopped[1]}"
        params["Version"] = f"sdlab {__version__}"
        return create_infotext(req.prompt, req.negative_prompt, params)

    def replay_infotext(self, req: GenerationRequest, position: int = 0) -> dict[str, object]:
        """sdlab's own infotext keys: what else changes an image's pixels on the same machine and
        the web UIs' keys do not record, so that `sdlab generate --from` can make it again byte for
        byte (`generate_cli.replay_settings` reads them back). The web UIs skip keys they do not
        know. Each is written only when a replay could get it wrong otherwise."""
        b = self.bundle
        # The compute dtype always: its default differs between machines (bf16 on AVX512-BF16 / AMX
        # CPUs, fp32 on others, fp16 on GPUs), and fp32 and bf16 differ by a few levels per pixel.
        params: dict[str, object] = {"sdlab dtype": dtype_name(b.dtype)}
        # Weights stored narrower than they compute are rounded, which changes nothing only when
        # the file already held them that narrow; whether it did is not known here.
        weights = storage_dtype(b.unet)
        if weights != b.dtype:
            params["sdlab weights"] = dtype_name(weights)
        # The VAE follows the compute dtype (`device.vae_dtype`) until an fp16 VAE overflows and
        # runs wider from then on (`perf.decode_latents`), for the images after it too.
        vae = next(b.vae.parameters()).dtype
        if vae != vae_dtype(b.device, b.dtype, b.family.name):
            params["sdlab VAE dtype"] = dtype_name(vae)
        if b.prediction_forced:  # `--prediction`: detection would give the file's own again
            params["sdlab prediction"] = b.prediction
        if b.family.zero_terminal_snr and not self.zero_terminal_snr(req):
            # The web UI's key says only "on"; without this a replay would follow the model's marker.
            params["sdlab zero terminal SNR"] = "off"
        if req.batch_size > 1:
            # An image computed in a batch differs by a level here and there from the same seed
            # computed alone (the kernels block the work differently): a replay runs the whole batch.
            params["sdlab batch size"] = req.batch_size
            params["sdlab batch pos"] = position
        if b.family.added_conditioning is not None:
            # SDXL's size and aesthetic conditioning, which the web UIs leave at their defaults.
            own = (req.height, req.width)
            if req.original_size not in (None, own):
                params["sdlab original size"] = _wxh(req.original_size)
            if req.target_size not in (None, own):
                params["sdlab target size"] = _wxh(req.target_size)
            if req.crop_top_left != GenerationRequest.crop_top_left:
                params["sdlab crop"] = _wxh(req.crop_top_left)
            if req.aesthetic_score != GenerationRequest.aesthetic_score:
                params["sdlab aesthetic score"] = req.aesthetic_score
            if req.negative_aesthetic_score != GenerationRequest.negative_aesthetic_score:
                params["sdlab negative aesthetic score"] = req.negative_aesthetic_score
        return params

    # -- internals ----------------------------------------------------------

    def _embeddings(self, prompt: str, negative: str) -> list[dict[str, Tensor]]:
        """Textual-inversion vectors for each text encoder (SDXL files hold clip_l and clip_g)."""
        self.embeddings.refresh()
        names = [None] if len(self.text) == 1 else ["clip_l", "clip_g"]
        out = []
        for runner, encoder in zip(self.text, names):
            width = runner.encoder.cfg.width
            for text in (prompt, negative):
                self.embeddings.check_prompt(text, runner.tokenizer, width, encoder)
            out.append(self.embeddings.tensors(width, encoder))
        return out

    def _extra_infotext(self, specs, text: str) -> dict[str, str]:
        extras = {}
        if specs:
            extras["Lora hashes"] = ", ".join(f"{s.name}: {self.models.lora_hash(s.path)}" for s in specs)
        used = [e for name, e in self.embeddings.embeddings.items() if name in text]
        if used:
            extras["TI hashes"] = ", ".join(f"{e.name}: {self.models.infotext_hash('embedding', e.path)}"
                                            for e in used)
        return extras

    def _stage(self, bundle: Bundle, runners: list[TextEncoderRunner], req: GenerationRequest, prompt: str,
               negative: str, concat: Tensor | None, schedule: DiscreteSchedule,
               embeddings=None) -> Callable[[int], CFGDenoiser]:
        """The guided denoiser of one model for each step (prompt editing changes it)."""
        cond_sched, uncond_sched = prompt_schedule(runners, [prompt, negative], req.steps, req.clip_skip,
                                                   embeddings)
        device, dtype, n = bundle.device, bundle.dtype, req.batch_size
        unet = bundle.unet
        # The copy: a UNet compiled with CUDA graphs (--compile on a GPU) hands out buffers that its
        # next call overwrites, and samplers keep results across calls.
        model = DiscreteDenoiser(lambda x_in, t, context, y=None: unet(x_in, t, context, y).clone(), schedule,
                                 bundle.prediction)

        def conditioning(encoded, negative: bool) -> Conditioning:
            ctx = encoded.context.to(device=device, dtype=dtype).expand(n, -1, -1)
            y = added_conditioning(bundle.config, encoded.pooled, req, negative)
            y = None if y is None else y.to(device=device, dtype=dtype).expand(n, -1)
            return Conditioning(context=ctx, y=y, concat=concat)

        current: dict = {"encoded": None, "cfg": None}

        def at(step: int) -> CFGDenoiser:
            encoded = (cond_sched.at(step), uncond_sched.at(step))
            if current["encoded"] != encoded:
                uncond = conditioning(encoded[1], True) if req.cfg_scale != 1.0 else None
                current["cfg"] = CFGDenoiser(model, conditioning(encoded[0], False), uncond, req.cfg_scale,
                                             req.guidance_rescale)
                current["encoded"] = encoded
            return current["cfg"]

        return at

    @torch.no_grad()
    def _generate_batch(self, req: GenerationRequest, prompt: str, negative: str, embeddings: list[dict],
                        sampler, schedule_name: str,
                        seeds: list[int], subseeds: list[int], batch: int,
                        callback: Callable[[Progress], None] | None
                        ) -> tuple[list[Image.Image], tuple[int, int] | None]:
        """The batch's images, and (steps done, steps to run) if the callback stopped it part-way."""
        b = self.bundle
        device = b.device
        fam = b.family
        vae_dtype = self._vae_dtype()
        factor = b.config.vae.downsample_factor
        latent_shape = (b.config.vae.latent_channels, req.height // factor, req.width // factor)
        rng = ImageRNG(latent_shape, seeds, req.rng, subseeds, req.subseed_strength)

        # The region we generate: the whole image, or the padded box around the mask.
        init_image, mask_image, crop = req.init_image, req.mask, None
        if mask_image is not None:
            mask_image = mask_image.convert("L")
            if req.inpainting_mask_invert:
                mask_image = Image.eval(mask_image, lambda v: 255 - v)
        if mask_image is not None and req.inpaint_full_res:
            crop = masked_bbox(mask_image, req.inpaint_full_res_padding, req.width, req.height)
            init_image, mask_image = init_image.crop(crop), mask_image.crop(crop)
        if init_image is not None:
            init_image = init_image.convert("RGB")
            if init_image.size != (req.width, req.height):
                init_image = init_image.resize((req.width, req.height), Image.LANCZOS)
            if mask_image is not None and mask_image.size != (req.width, req.height):
                mask_image = mask_image.resize((req.width, req.height), Image.LANCZOS)

        schedule = self.schedules[self.zero_terminal_snr(req)]
        sigmas = get_sampler_sigmas(sampler, schedule_name, req.steps, schedule)

        # Random draws happen in diffusers' order (image latent, initial noise, masked-image
        # latent), so the same seed gives the same image as its pipelines.
        scale = fam.latent_scale
        n = req.batch_size
        inpaint_unet = b.config.unet.in_channels == 9
        init_latent = concat = latent_mask = mask = None
        if init_image is not None:
            pixels = to_tensor(init_image).to(device=device, dtype=vae_dtype)
            # 9-channel models at full strength start from pure noise: the image enters only
            # through the masked-image channels.
            if not (inpaint_unet and mask_image is not None and req.denoising_strength >= 1.0):
                init_latent = self._encode(pixels, rng) * scale
        noise = rng.first().to(device=device, dtype=torch.float32)  # (B, C, h, w), drawn on the CPU
        if mask_image is not None:
            mask = mask_to_tensor(mask_image).to(device)
            if inpaint_unet:
                mask = (mask >= 0.5).float()
                masked_latent = self._encode(pixels * (mask < 0.5).to(pixels.dtype), rng) * scale
                small = torch.nn.functional.interpolate(mask, size=latent_shape[1:])
                concat = torch.cat([small, masked_latent], dim=1).expand(n, -1, -1, -1)
            else:
                latent_mask = torch.nn.functional.interpolate(mask, size=latent_shape[1:])

        if init_latent is None:
            x = noise * sigmas[0]
        else:
            # Denoising strength: steps x strength sampler steps, from the matching sigma.
            t_enc = int(req.steps * req.denoising_strength)
            if t_enc == 0:
                return self._decode_images(init_latent.expand(n, -1, -1, -1), req, mask_image, crop), None
            sigmas = sigmas[-(t_enc + 1):]
            x = init_latent + noise * sigmas[0]

        # With a refiner, the base model samples the first part of the steps and the refiner the rest.
        total = len(sigmas) - 1
        offset = req.steps - total  # img2img starts part-way; prompt editing counts requested steps
        parts = [(self._stage(self.bundle, self.text, req, prompt, negative, concat, schedule, embeddings), sigmas)]
        if self.refiner is not None and req.refiner_switch_at is not None and req.refiner_switch_at < 1.0:
            switch = min(max(int(req.steps * req.refiner_switch_at) - offset, 0), total)
            refiner = self._stage(self.refiner, self.refiner_text, req, prompt, negative, concat, schedule)
            parts = [(parts[0][0], sigmas[:switch + 1]), (refiner, sigmas[switch:])]
            parts = [(stage, part) for stage, part in parts if len(part) > 1]
        state = {"step": 0, "x0": x, "stage": parts[0][0]}

        def denoise(x_t: Tensor, sigma: Tensor) -> Tensor:
            x0 = state["stage"](state["step"] + offset)(x_t, sigma)
            if latent_mask is not None:
                # Ordinary UNet inpainting: keep the original outside the mask at every step.
                x0 = init_latent * (1 - latent_mask) + x0 * latent_mask
            return x0

        if sampler.brownian_noise:
            noise_sampler = brownian_tree_noise_sampler(x, sigmas, seeds)
        else:
            noise_sampler = lambda sigma, sigma_next: rng.draw_like(x)  # noqa: E731
        knobs = {"eta": req.eta} if req.eta is not None and sampler.default_eta is not None else {}

        stopped = None
        try:
            for stage, part in parts:
                state["stage"] = stage
                done = state["step"]

                def on_step(i: int, n_steps: int, x_t: Tensor, denoised: Tensor, done=done) -> None:
                    state["step"], state["x0"] = done + i + 1, denoised
                    if callback is not None:
                        callback(Progress(done + i + 1, total, batch, req.n_iter, denoised,
                                          lambda d=denoised: latent_preview(d)))

                x = sampler.function(denoise, x, part, callback=on_step, noise_sampler=noise_sampler, **knobs)
        except Interrupted:
            if state["step"] == 0:
                raise
            x, stopped = state["x0"], (state["step"], total)
        if latent_mask is not None:
            x = init_latent.float() * (1 - latent_mask) + x * latent_mask
        return self._decode_images(x, req, mask_image, crop), stopped

    def _vae_dtype(self) -> torch.dtype:
        """The VAE runs in fp32 on the CPU, where fp16/bf16 cost accuracy for little speed;
        a VAE loaded in half precision is upcast here, once, at its first use."""
        vae = self.bundle.vae
        if self.bundle.device.type == "cpu" and next(vae.parameters()).dtype != torch.float32:
            vae.float()
        return next(vae.parameters()).dtype

    def _encode(self, pixels: Tensor, rng: ImageRNG) -> Tensor:
        """A sample of the image's latent distribution, drawn from the first image's generator."""
        dist = encode_images(self.bundle.vae, pixels)  # tiled when large; fp16 overflow guarded
        eps = rng.draw(rng.generators[0], tuple(dist.mean.shape)).to(dist.mean.device, dist.mean.dtype)
        return (dist.mean + dist.std * eps).float()

    def _decode_images(self, x: Tensor, req: GenerationRequest, mask_image: Image.Image | None,
                       crop) -> list[Image.Image]:
        vae = self.bundle.vae
        vae_dtype = self._vae_dtype()
        decoded = decode_latents(vae, (x / self.bundle.family.latent_scale).to(vae_dtype))
        images = to_pil(decoded)
        if mask_image is None:
            return images
        # Paste the result over the original with the (blurred) mask as alpha, so the
        # pixels outside the mask come back unchanged.
        alpha = blur_mask(mask_image, req.mask_blur)
        original = req.init_image.convert("RGB")
        out = []
        for img in images:
            if crop is not None:
                img = img.resize((crop[2] - crop[0], crop[3] - crop[1]), Image.LANCZOS)
                a = alpha.resize(img.size, Image.LANCZOS)
                full = original.copy()
                full.paste(Image.composite(img, original.crop(crop), a), crop[:2])
                out.append(full)
            else:
                base = original if original.size == img.size else original.resize(img.size, Image.LANCZOS)
                out.append(Image.composite(img, base, alpha))
        return out
