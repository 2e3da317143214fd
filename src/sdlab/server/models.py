"""Request and response bodies of the web UI's API, written out by hand.

Field names and defaults are AUTOMATIC1111's (`modules/processing.py`'s
`StableDiffusionProcessingTxt2Img` / `...Img2Img` plus the API-only keys of
`modules/api/models.py`), so clients written against it work unchanged. Fields sdlab
does not implement are still declared, so their presence is no error; a request that
sets one to something other than its default gets a note in the response's `info`.
Keys no model declares are accepted too (`extra="allow"`) and reported the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class GenerationFields(BaseModel):
    """Fields common to txt2img and img2img (`StableDiffusionProcessing`)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field("",
                        description="What to draw. Web UI syntax: (word:1.2), [from:to:when], BREAK, <lora:NAME:1>.")
    negative_prompt: str = Field("", description="What to steer away from.")
    styles: list[str] | None = Field(None, description="Saved prompt styles (not implemented; ignored).")
    seed: int = Field(-1, ge=-1, le=MAX_SEED,
                      description="Seed of the first image; -1 picks one at random. Image i of a batch uses seed + i.")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="Variation seed; -1 picks one at random.")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                                    description="How far to move toward the variation seed's noise (0 = none).")
    seed_resize_from_h: int = Field(-1, description="Seed resize from height (not implemented; ignored).")
    seed_resize_from_w: int = Field(-1, description="Seed resize from width (not implemented; ignored).")
    sampler_name: str | None = Field(None,
        description="Sampler, e.g. 'Euler a', 'DPM++ 2M'; the pre-1.9 combined names ('DPM++ 2M Karras') work too. "
                    "See GET /sdapi/v1/samplers.")
    sampler_index: int | str = Field("Euler",
        description="Deprecated alias of sampler_name, used when sampler_name is not given.")
    scheduler: str | None = Field(None,
        description="Schedule type, e.g. 'Karras', 'Exponential'; default 'Automatic' (the sampler's own). See GET "
                    "/sdapi/v1/schedulers.")
    batch_size: int = Field(1, ge=1, description="Images per batch (made together).")
    n_iter: int = Field(1, ge=1, description="Batch count: batches made one after another.")
    steps: int = Field(50, ge=1, description="Sampling steps.")
    cfg_scale: float = Field(7.0, ge=0.0, allow_inf_nan=False, description="Classifier-free guidance scale.")
    width: int = Field(512, ge=8, description="Image width in pixels, a multiple of 8.")
    height: int = Field(512, ge=8, description="Image height in pixels, a multiple of 8.")
    restore_faces: bool | None = Field(None, description="Face restoration (not implemented; ignored).")
    tiling: bool | None = Field(None, description="Tileable images (not implemented; ignored).")
    do_not_save_samples: bool = Field(False,
        description="sdlab's server never saves images to disk; accepted for compatibility.")
    do_not_save_grid: bool = Field(False, description="sdlab's server never saves grids; accepted for compatibility.")
    eta: float | None = Field(None, ge=0.0, allow_inf_nan=False,
                              description="Noise multiplier of ancestral / SDE samplers (None: the sampler's default).")
    s_min_uncond: float | None = Field(None, description="Negative guidance minimum sigma (not implemented; ignored).")
    s_churn: float | None = Field(None, description="Sigma churn (not implemented; ignored).")
    s_tmax: float | None = Field(None, description="Sigma tmax (not implemented; ignored).")
    s_tmin: float | None = Field(None, description="Sigma tmin (not implemented; ignored).")
    s_noise: float | None = Field(None, description="Sigma noise (not implemented; ignored).")
    override_settings: dict[str, Any] = Field(default_factory=dict,
        description="Options for this request only: sd_model_checkpoint, CLIP_stop_at_last_layers, randn_source, "
                    "sd_noise_schedule.")
    override_settings_restore_afterwards: bool = Field(True,
        description="sdlab always restores; overrides apply to this request only.")
    refiner_checkpoint: str | None = Field(None, description="SDXL refiner (not implemented; ignored).")
    refiner_switch_at: float | None = Field(None, description="SDXL refiner switch point (not implemented; ignored).")
    disable_extra_networks: bool = Field(False, description="Ignore <lora:...> tags in the prompt.")
    comments: dict[str, Any] | None = Field(None, description="Free-form comments (ignored).")
    force_task_id: str | None = Field(None,
                                      description="Task id to report in progress (accepted; sdlab makes its own).")
    script_name: str | None = Field(None, description="Web UI script (not implemented; ignored).")
    script_args: list[Any] = Field(default_factory=list, description="Arguments of script_name (ignored).")
    send_images: bool = Field(True, description="Return the images in the response.")
    save_images: bool = Field(False, description="Save images on the server (not implemented; ignored).")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict,
        description="Extension scripts such as ControlNet (not implemented; ignored).")
    infotext: str | None = Field(None,
        description="Infotext (PNG parameters) whose values fill every field the request leaves unset.")


class Txt2ImgRequest(GenerationFields):
    """POST /sdapi/v1/txt2img (`StableDiffusionProcessingTxt2Img`)."""

    enable_hr: bool = Field(False, description="Hires fix (not implemented; ignored).")
    denoising_strength: float | None = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False,
                                             description="Hires fix denoising strength (hires fix is not implemented).")
    firstphase_width: int = Field(0, description="Hires fix (ignored).")
    firstphase_height: int = Field(0, description="Hires fix (ignored).")
    hr_scale: float = Field(2.0, description="Hires fix (ignored).")
    hr_upscaler: str | None = Field(None, description="Hires fix (ignored).")
    hr_second_pass_steps: int = Field(0, description="Hires fix (ignored).")
    hr_resize_x: int = Field(0, description="Hires fix (ignored).")
    hr_resize_y: int = Field(0, description="Hires fix (ignored).")
    hr_checkpoint_name: str | None = Field(None, description="Hires fix (ignored).")
    hr_sampler_name: str | None = Field(None, description="Hires fix (ignored).")
    hr_scheduler: str | None = Field(None, description="Hires fix (ignored).")
    hr_prompt: str = Field("", description="Hires fix (ignored).")
    hr_negative_prompt: str = Field("", description="Hires fix (ignored).")
    firstpass_image: str | None = Field(None, description="Hires fix (ignored).")


class Img2ImgRequest(GenerationFields):
    """POST /sdapi/v1/img2img (`StableDiffusionProcessingImg2Img`); a mask makes it inpainting."""

    init_images: list[str] = Field(..., min_length=1,
        description="Base64 images (PNG/JPEG/WebP; a data: URL prefix is fine). The first is used.")
    resize_mode: int = Field(0, ge=0, le=3, description="0: just resize (others not implemented).")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False,
                                      description="How much to change the image: 0 keeps it, 1 replaces it.")
    image_cfg_scale: float | None = Field(None, description="Instruct-pix2pix image CFG (not implemented; ignored).")
    mask: str | None = Field(None, description="Base64 mask, white = repaint; makes the request inpainting.")
    mask_blur_x: int = Field(4, ge=0,
                             description="Mask blur, horizontal (sdlab blurs evenly: it uses mask_blur, else this).")
    mask_blur_y: int = Field(4, ge=0, description="Mask blur, vertical.")
    mask_blur: int | None = Field(None, ge=0, description="Mask blur in pixels for both directions.")
    mask_round: bool = Field(True, description="Round the mask to 0/1 in latent space (accepted).")
    inpainting_fill: int = Field(0, ge=0, le=3,
        description="Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing. sdlab starts from the "
                    "original (1).")
    inpaint_full_res: bool | int = Field(True,
        description="Inpaint area 'Only masked': work on the padded box around the mask at full resolution.")
    inpaint_full_res_padding: int = Field(0, ge=0, description="Padding around the mask for 'Only masked', in pixels.")
    inpainting_mask_invert: int | bool = Field(0, ge=0, le=1, description="1: repaint what the mask leaves black.")
    initial_noise_multiplier: float | None = Field(None, description="Not implemented; ignored.")
    latent_mask: str | None = Field(None, description="Not implemented; ignored.")
    include_init_images: bool = Field(False, description="Echo init_images back in 'parameters'.")


class GenerationResponse(BaseModel):
    images: list[str] = Field(
        description="Generated images, base64 PNG; each carries its infotext in the 'parameters' text chunk.")
    parameters: dict[str, Any] = Field(description="The request, echoed back.")
    info: str = Field(
        description="JSON string: infotexts, all_seeds, all_prompts, seed, width, height, sampler_name, ... "
                    "(the web UI's Processed.js()).")


class TextToImageResponse(GenerationResponse):
    pass


class ImageToImageResponse(GenerationResponse):
    pass


class ProgressResponse(BaseModel):
    progress: float = Field(description="Progress of the running job, 0..1.")
    eta_relative: float = Field(description="Estimated seconds left.")
    state: dict[str, Any] = Field(
        description="skipped, interrupted, job, job_count, job_timestamp, job_no, sampling_step, sampling_steps, "
                    "queued.")
    current_image: str | None = Field(None, description="A preview of the image being made, base64 PNG.")
    textinfo: str | None = Field(None, description="A line about what the server is doing.")


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class SDModelItem(BaseModel):
    title: str = Field(
        description="'name.safetensors [hash]' once the hash is known; what options.sd_model_checkpoint takes.")
    model_name: str
    hash: str | None = Field(
        description="Short hash: first 10 hex digits of the file's SHA-256 (known after first load).")
    sha256: str | None
    filename: str
    config: str | None = None


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int | None = None
    vectors: int | None = None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class PNGInfoRequest(BaseModel):
    image: str = Field(..., description="Base64 image (a data: URL prefix is fine).")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="The infotext ('parameters' chunk), '' if none.")
    items: dict[str, Any] = Field(description="The image's other text chunks.")
    parameters: dict[str, Any] = Field(
        description="The infotext parsed into fields (Prompt, Negative prompt, Steps, Sampler, ...).")


class MemoryResponse(BaseModel):
    ram: dict[str, Any] = Field(description="System memory in bytes: free, used (this process), total.")
    cuda: dict[str, Any] = Field(description="GPU memory in bytes, or {'error': 'unavailable'}.")
