"""A generation request as the web UIs' API names its parts, its checks and its result.

Every face of sdlab (Python, CLI, HTTP, web page) builds one `GenerationRequest`; the web UI's
recipe (`recipes.webui`) runs it on a `Pipeline`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from PIL import Image
from torch import Tensor

from .errors import SdlabError
from .hires import check_hires, latent_mode
from .lora import lora_specs
from .models_dir import ModelsDir
from .resize import LATENT_UPSCALE, check_resize_mode
from .sampling.rng import RngSource
from .sampling.samplers import resolve_sampler
from .sampling.schedules import resolve_schedule
from .text.prompt import extract_extra_networks

__all__ = ["GenerationRequest", "GenerationResult", "Interrupted", "MAX_SEED", "Progress", "check_request",
           "validate"]

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
    # How the init image is fitted to width x height, the web UI's resize_mode (`resize.py`):
    # 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale).
    resize_mode: int = 0
    # The web UI's separate latent mask (its outpainting scripts draw one): where the latent is
    # repainted; None: the mask. The mask alone decides the paste-back.
    latent_mask: Image.Image | None = None
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
    # ControlNet units (`controlnet.units.ControlRequest`, or ready `controlnet.apply.ControlUnit`s).
    controls: list = field(default_factory=list)
    # Flow models (SD3): the sampling shift; None: the model's (3.0, or its diffusers scheduler's).
    shift: float | None = None
    # SD3.5's skip-layer guidance (`recipes/sd3.py`): joint blocks left out of an extra conditional
    # pass, its scale, and the fractions of the steps it applies between (diffusers' defaults).
    slg_layers: tuple[int, ...] = ()
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_end: float = 0.2
    # Hires fix (txt2img): a second pass at a larger size from the upscaled first pass, at
    # `denoising_strength` (`hires.py` has the rules, `recipes/hires.py` the pass).
    enable_hr: bool = False
    hr_scale: float = 2.0  # used when hr_resize_x and hr_resize_y are both 0
    hr_resize_x: int = 0  # explicit target size; one side 0 follows the aspect ratio
    hr_resize_y: int = 0
    hr_upscaler: str | None = None  # None: "Latent"; a latent mode or an image upscaler's name
    hr_second_pass_steps: int = 0  # 0: steps
    hr_sampler_name: str | None = None  # None: the first pass's sampler
    hr_scheduler: str | None = None  # None: the first pass's schedule
    hr_prompt: str = ""  # "": the prompt
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None  # Forge's; None: cfg_scale
    hr_checkpoint_name: str | None = None  # only the same checkpoint (None / "Use same checkpoint")

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
    # The hint of each ControlNet unit (`request.controls`, in order) at the generation size: the
    # detected maps the web UI's ControlNet extension shows and its API appends to the images.
    detected_maps: list[Image.Image] = field(default_factory=list)


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
    if req.latent_mask is not None and req.mask is None:
        raise SdlabError("a latent mask goes with a mask; give the mask too")
    check_resize_mode(req.resize_mode)
    if req.resize_mode == LATENT_UPSCALE and req.mask is not None:
        # The web UI fails on it too: its mask is resized, its image not.
        raise SdlabError("resize mode 3 (latent upscale) does not inpaint; use resize mode 0-2 with a mask")
    resolve_sampler(req.sampler)
    resolve_schedule(req.schedule)
    check_hires(req)
    if models is not None:
        lora_specs(extract_extra_networks(req.prompt)[1], models.resolve_lora)
        if req.enable_hr and latent_mode(req.hr_upscaler) is None:
            from .upscalers import Upscalers

            Upscalers(models.root).find(req.hr_upscaler)


def validate(req: GenerationRequest, default_size: int, multiple: int = 8) -> GenerationRequest:
    """Check a request (`check_request`); fill defaults. Sizes must be multiples of `multiple`
    (the model's: 8 for the UNet families). A mask of another size than the init image is
    resized to it, as the web UI does (clients and painting tools draw masks at another scale)."""
    check_request(req)
    if req.init_image is not None and not (req.width and req.height):
        # img2img / inpaint default to the init image's own size (rounded down to the multiple).
        default_w, default_h = (max(multiple, v // multiple * multiple) for v in req.init_image.size)
    else:
        default_w = default_h = default_size
    width, height = req.width or default_w, req.height or default_h
    for name, v in (("width", width), ("height", height)):
        if v % multiple:
            raise SdlabError(f"{name} {v} is not a multiple of {multiple}, which this model needs; "
                             f"try {max(multiple, v // multiple * multiple)}")
    mask = req.mask
    if mask is not None and mask.size != req.init_image.size:
        mask = mask.convert("L").resize(req.init_image.size, Image.LANCZOS)
    latent_mask = req.latent_mask
    if latent_mask is not None and latent_mask.size != req.init_image.size:
        latent_mask = latent_mask.convert("L").resize(req.init_image.size, Image.LANCZOS)
    seed = random.randrange(MAX_SEED) if req.seed is None or req.seed < 0 else int(req.seed)
    subseed = random.randrange(MAX_SEED) if req.subseed is None or req.subseed < 0 else int(req.subseed)
    return replace(req, width=width, height=height, seed=seed, subseed=subseed, mask=mask, latent_mask=latent_mask)
