"""Request and response bodies of the web UI's API, written out by hand.

Field names and defaults are AUTOMATIC1111's (`modules/processing.py`'s
`StableDiffusionProcessingTxt2Img` / `...Img2Img` plus the API-only keys of
`modules/api/models.py`), so clients written against it work unchanged. Fields of
features sdlab does not have are declared too: sent with a value that means "off" (their
default, or what clients send for it) they pass, and a request that turns one on is
refused with 422 naming the field (`convert.NOT_ACTED_ON`), never answered with an image
made without it. Keys no model declares pass with a note in the response's `info`
(`extra="allow"`), as the web UI drops them silently.
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
    styles: list[str] | None = Field(None,
        description="Saved prompt styles by name (the server's styles.csv, GET /sdapi/v1/prompt-styles), merged into "
                    "the prompts in this order; a name not in the file is refused.")
    seed: int = Field(-1, ge=-1, le=MAX_SEED,
                      description="Seed of the first image; -1 picks one at random. Image i of a batch uses seed + i.")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="Variation seed; -1 picks one at random.")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                                    description="How far to move toward the variation seed's noise (0 = none).")
    seed_resize_from_h: int = Field(-1, description="Seed resize from height (not implemented; refused unless off).")
    seed_resize_from_w: int = Field(-1, description="Seed resize from width (not implemented; refused unless off).")
    seed_enable_extras: bool = Field(True,
        description="false: the variation seed (subseed_strength) and seed resize are not used.")
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
    restore_faces: bool | None = Field(None, description="Face restoration (not implemented; refused unless off).")
    tiling: bool | None = Field(None,
        description="Seamless images that tile: the UNet's and VAE's convolutions pad circularly. Infotext 'Tiling: "
                    "True'.")
    do_not_save_samples: bool = Field(False,
        description="No effect: as in the web UI's API, save_images alone decides whether images are saved.")
    do_not_save_grid: bool = Field(False,
        description="No effect: as in the web UI's API, save_images alone decides (sdlab saves no grids).")
    eta: float | None = Field(None, ge=0.0, allow_inf_nan=False,
                              description="Noise multiplier of ancestral / SDE samplers (None: the sampler's default).")
    s_min_uncond: float | None = Field(None,
        description="Negative guidance minimum sigma (not implemented; refused unless off).")
    s_churn: float | None = Field(None, description="Sigma churn (not implemented; refused unless off).")
    s_tmax: float | None = Field(None, description="Sigma tmax (used with s_churn only).")
    s_tmin: float | None = Field(None, description="Sigma tmin (used with s_churn only).")
    s_noise: float | None = Field(None, description="Sigma noise (not implemented; refused unless off).")
    override_settings: dict[str, Any] = Field(default_factory=dict,
        description="Options for this request only: sd_model_checkpoint, CLIP_stop_at_last_layers, randn_source, "
                    "sd_noise_schedule.")
    override_settings_restore_afterwards: bool = Field(True,
        description="Overrides apply to this request only; false is not implemented (refused).")
    refiner_checkpoint: str | None = Field(None, description="SDXL refiner (not implemented; refused unless off).")
    refiner_switch_at: float | None = Field(None,
        description="SDXL refiner switch point (used with refiner_checkpoint only).")
    disable_extra_networks: bool = Field(False, description="Ignore <lora:...> tags in the prompt.")
    comments: dict[str, Any] | None = Field(None,
        description="Free-form comments (not implemented; refused unless off).")
    force_task_id: str | None = Field(None,
        description="Task id for the web UI's /internal/progress (not implemented; refused unless off).")
    script_name: str | None = Field(None,
        description="Web UI script, any case: \"x/y/z plot\", \"prompt matrix\", \"prompts from file or textbox\"; "
                    "img2img also \"poor man's outpainting\", \"outpainting mk2\" (docs/scripts.md, GET "
                    "/sdapi/v1/scripts); others are refused.")
    script_args: list[Any] = Field(default_factory=list,
        description="Arguments of script_name in the web UI 1.10's positional order (GET /sdapi/v1/script-info); "
                    "those left out take their defaults.")
    send_images: bool = Field(True, description="Return the images in the response.")
    save_images: bool = Field(False,
        description="Also write the images to the server's outputs folder as the web UI does: "
                    "txt2img-images/YYYY-MM-DD/NNNNN-SEED.png (img2img-images/ for img2img), infotext included.")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict,
        description="Extension scripts such as ControlNet (sdlab has none: any entry is refused).")
    infotext: str | None = Field(None,
        description="Infotext (PNG parameters) whose values fill every field the request leaves unset.")
    # SD3 / SD3.5 (flow models). The web UI and Forge have no fields for these; sdlab's names
    # follow its CLI (--shift, --slg-*), and SD.Next's name for the shift is accepted too. Sent
    # to another family they are refused (422), as the pipeline refuses them.
    shift: float | None = Field(None, gt=0.0, allow_inf_nan=False,
        description="SD3 / SD3.5: the flow sampling shift (null: the model's, 3). Infotext 'Shift'.")
    schedulers_shift: float | None = Field(None, gt=0.0, allow_inf_nan=False,
        description="SD.Next's name for shift; used when shift is not given.")
    slg_layers: list[int] | None = Field(None,
        description="SD3.5: skip-layer guidance, the MMDiT layers left out of an extra conditional pass (SD3.5 "
                    "medium: [7, 8, 9]); null or []: off. Infotext 'SLG layers'.")
    slg_scale: float = Field(2.8, allow_inf_nan=False,
        description="Skip-layer guidance scale (used with slg_layers only; diffusers' default).")
    slg_start: float = Field(0.01, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Skip-layer guidance from this fraction of the steps (used with slg_layers only).")
    slg_end: float = Field(0.2, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Skip-layer guidance until this fraction of the steps (used with slg_layers only).")


class Txt2ImgRequest(GenerationFields):
    """POST /sdapi/v1/txt2img (`StableDiffusionProcessingTxt2Img`)."""

    enable_hr: bool = Field(False,
        description="Hires fix: a second pass at a larger size from the upscaled first pass, at denoising_strength. "
                    "The infotext's Size and info's width/height stay the first pass's.")
    denoising_strength: float | None = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Hires fix denoising strength (used with enable_hr only; null: 0.75). The web UI's schema "
                    "makes this 0 when left out; sdlab keeps 0.75.")
    firstphase_width: int = Field(0,
        description="Legacy hires fix first-pass size (not implemented; refused unless 0).")
    firstphase_height: int = Field(0,
        description="Legacy hires fix first-pass size (not implemented; refused unless 0).")
    hr_scale: float = Field(2.0, description="Hires fix: upscale by this (used when hr_resize_x and _y are both 0).")
    hr_upscaler: str | None = Field(None,
        description="Hires fix upscaler: a latent mode (GET /sdapi/v1/latent-upscale-modes; null: 'Latent') or an "
                    "upscaler (GET /sdapi/v1/upscalers).")
    hr_second_pass_steps: int = Field(0, ge=0,
        description="Hires fix steps (0: steps); they run as the last ones of int(n / denoising_strength) steps.")
    hr_resize_x: int = Field(0, ge=0, description="Hires fix target width (0: from hr_resize_y and the aspect ratio).")
    hr_resize_y: int = Field(0, ge=0,
        description="Hires fix target height (0: from hr_resize_x); both set: fill, then crop the centre.")
    hr_checkpoint_name: str | None = Field(None,
        description="Hires fix checkpoint: only null or 'Use same checkpoint' (another one is refused).")
    hr_sampler_name: str | None = Field(None, description="Hires fix sampler (null: sampler_name).")
    hr_scheduler: str | None = Field(None, description="Hires fix schedule type (null: scheduler).")
    hr_prompt: str = Field("", description="Hires fix prompt ('': the prompt).")
    hr_negative_prompt: str = Field("", description="Hires fix negative prompt ('': the negative prompt).")
    hr_cfg: float | None = Field(None, ge=0.0, allow_inf_nan=False,
        description="Hires fix CFG scale (Forge's field; null: cfg_scale, where Forge's API defaults to 1).")
    firstpass_image: str | None = Field(None,
        description="A first-pass image to start the hires fix from (not implemented; refused unless off).")


class Img2ImgRequest(GenerationFields):
    """POST /sdapi/v1/img2img (`StableDiffusionProcessingImg2Img`); a mask makes it inpainting."""

    init_images: list[str] = Field(..., min_length=1,
        description="One base64 image (PNG/JPEG/WebP; a data: URL prefix is fine).")
    resize_mode: int = Field(0, ge=0, le=3,
        description="How init_images[0] is fitted to width x height: 0 just resize, 1 crop and resize, 2 resize and "
                    "fill, 3 just resize (latent upscale; not with a mask).")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0, allow_inf_nan=False,
                                      description="How much to change the image: 0 keeps it, 1 replaces it.")
    image_cfg_scale: float | None = Field(None,
        description="Instruct-pix2pix image CFG; as in the web UI, no effect on other models (sdlab loads no "
                    "instruct-pix2pix model).")
    mask: str | None = Field(None, description="Base64 mask, white = repaint; makes the request inpainting.")
    mask_blur_x: int = Field(4, ge=0,
                             description="Mask blur, horizontal (sdlab blurs evenly: mask_blur, else this; a different "
                                         "mask_blur_y is refused).")
    mask_blur_y: int = Field(4, ge=0, description="Mask blur, vertical.")
    mask_blur: int | None = Field(None, ge=0, description="Mask blur in pixels for both directions.")
    mask_round: bool = Field(True,
        description="Round the mask to 0/1 in latent space; false is not implemented (refused).")
    inpainting_fill: int = Field(0, ge=0, le=3,
        description="Masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing. sdlab starts from the "
                    "original (1) for 0 too (with a note); 2 and 3 are refused.")
    inpaint_full_res: bool | int = Field(True,
        description="Inpaint area 'Only masked': work on the padded box around the mask at full resolution.")
    inpaint_full_res_padding: int = Field(0, ge=0, description="Padding around the mask for 'Only masked', in pixels.")
    inpainting_mask_invert: int | bool = Field(0, ge=0, le=1, description="1: repaint what the mask leaves black.")
    initial_noise_multiplier: float | None = Field(None,
        description="Initial noise multiplier (not implemented; refused unless off).")
    latent_mask: str | None = Field(None,
        description="Base64 mask of where the latent is repainted (white), if not the mask; the mask still decides "
                    "the paste-back. Used with mask only.")
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


# -- listings the web UI's clients read at startup (A1111 modules/api/models.py) --------------------

class UpscalerItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


class LatentUpscalerModeItem(BaseModel):
    name: str


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class HypernetworkItem(BaseModel):
    name: str
    path: str | None


class FaceRestorerItem(BaseModel):
    name: str
    cmd_dir: str | None


class RealesrganItem(BaseModel):
    name: str
    path: str | None
    scale: int | None


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None
    negative_prompt: str | None


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(description="The txt2img scripts sdlab runs, lowercase titles; 'controlnet' always on.")
    img2img: list[str] = Field(description="The img2img scripts sdlab runs, lowercase titles; 'controlnet' always on.")


class ScriptArg(BaseModel):
    label: str | None = None
    value: Any | None = None
    minimum: Any | None = None
    maximum: Any | None = None
    step: Any | None = None
    choices: list[str] | None = None


class ScriptInfo(BaseModel):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[ScriptArg]


class ExtensionItem(BaseModel):
    name: str
    remote: str
    branch: str
    commit_hash: str
    version: str
    commit_date: str
    enabled: bool


class InterrogateRequest(BaseModel):
    image: str = Field("", description="Base64 image.")
    model: str = Field("clip", description="'clip' or 'deepdanbooru' in the web UI; sdlab has neither.")
