"""The web UI's hires fix, its rules over plain values: the target size, the second pass's step
rule, the upscaler's kind, the checks and the infotext keys (AUTOMATIC1111 `modules/processing.py`,
`StableDiffusionProcessingTxt2Img`; see ../shared/reference/webui-extras.md section 1).

The second pass itself is a recipe over the generation steps (`recipes/hires.py`); this module
knows nothing of models, so the request's checks, the server's limits and the infotext can use
it before a model loads.

- Target: `int(w * hr_scale)` x `int(h * hr_scale)` unless `hr_resize_x/y` is given; with one
  of them 0 the other follows the aspect ratio (`x * h // w`); with both the image is scaled to
  fill and the excess is cropped from the centre in latent space (`truncate`, latent cells).
  The output is always the target rounded down to a multiple of the latent factor.
- Steps: `hr_second_pass_steps or steps` steps run exactly, the last ones of a schedule of
  `int(n / min(denoise, 0.999))` steps (`setup_img2img_steps`' "fixed steps" branch).
- Upscaler: None is "Latent"; the six latent modes interpolate the latent; any other name is an
  image upscaler (`upscalers.Upscalers`): decode, upscale, encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import SdlabError

if TYPE_CHECKING:
    from .request import GenerationRequest

__all__ = ["HiresTarget", "check_hires", "hires_infotext", "latent_mode", "schedule_steps", "second_pass_steps",
           "target"]

DEFAULT_UPSCALER = "Latent"  # the web UI's latent_upscale_default_mode
SAME_CHECKPOINT = (None, "", "Use same checkpoint")


@dataclass(frozen=True)
class HiresTarget:
    """Where the first pass's latent goes: `upscale_to` (w, h) in pixels before the crop,
    `truncate` (x, y) in latent cells cropped from the centre, `size` (w, h) of the output."""

    upscale_to: tuple[int, int]
    truncate: tuple[int, int]
    size: tuple[int, int]


def target(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0,
           factor: int = 8) -> HiresTarget:
    """The web UI's `calculate_target_resolution` for a first pass of `width` x `height`."""
    tx = ty = 0
    if resize_x == 0 and resize_y == 0:
        to_x, to_y = int(width * scale), int(height * scale)
    elif resize_y == 0:
        to_x, to_y = resize_x, resize_x * height // width
    elif resize_x == 0:
        to_x, to_y = resize_y * width // height, resize_y
    else:
        if width / height < resize_x / resize_y:
            to_x, to_y = resize_x, resize_x * height // width
        else:
            to_x, to_y = resize_y * width // height, resize_y
        tx, ty = (to_x - resize_x) // factor, (to_y - resize_y) // factor
    size = ((to_x // factor - tx) * factor, (to_y // factor - ty) * factor)
    return HiresTarget((to_x, to_y), (tx, ty), size)


def request_target(req: GenerationRequest, factor: int = 8) -> HiresTarget:
    return target(req.width, req.height, req.hr_scale, req.hr_resize_x, req.hr_resize_y, factor)


def second_pass_steps(req: GenerationRequest) -> int:
    """The steps the second pass runs: `hr_second_pass_steps`, 0 meaning `steps`."""
    return req.hr_second_pass_steps or req.steps


def schedule_steps(steps: int, denoise: float) -> int:
    """The length of the schedule whose last `steps` steps the second pass runs (0: no sampling,
    denoising strength 0 keeps the upscaled image)."""
    return int(steps / min(denoise, 0.999)) if denoise > 0 else 0


def latent_mode(name: str | None) -> tuple[str, bool] | None:
    """(interpolation mode, antialias) of a latent upscaler name, None for an image upscaler."""
    from .upscalers import LATENT_UPSCALE_MODES

    name = DEFAULT_UPSCALER if name is None else name
    if name in LATENT_UPSCALE_MODES:
        return LATENT_UPSCALE_MODES[name]
    folded = {k.lower(): v for k, v in LATENT_UPSCALE_MODES.items()}
    return folded.get(name.strip().lower())


def check_hires(req: GenerationRequest, max_pixels: int | None = None) -> None:
    """The hires fix's checks that need no model. Errors are one line that says what to change."""
    if not req.enable_hr:
        return
    if req.init_image is not None:
        raise SdlabError("hires fix is for txt2img; for an init image use img2img at the size you want")
    if req.hr_resize_x < 0 or req.hr_resize_y < 0:
        raise SdlabError(f"hires resize {req.hr_resize_x}x{req.hr_resize_y}: sizes must not be negative (0: follow "
                         "the other side's aspect ratio)")
    if req.hr_resize_x == 0 and req.hr_resize_y == 0 and not req.hr_scale > 0:
        raise SdlabError(f"hires scale must be above 0, got {req.hr_scale:g} (e.g. 2 for twice the size)")
    if req.hr_second_pass_steps < 0:
        raise SdlabError(f"hires steps must be 0 (as many as steps) or more, got {req.hr_second_pass_steps}")
    if req.hr_cfg is not None and req.hr_cfg < 0:
        raise SdlabError(f"hires CFG scale must not be negative, got {req.hr_cfg}")
    if req.hr_checkpoint_name not in SAME_CHECKPOINT:
        raise SdlabError(f"hires checkpoint {req.hr_checkpoint_name!r}: a second checkpoint for the hires pass is "
                         "not supported by sdlab; leave it out (or 'Use same checkpoint')")
    if req.hr_upscaler is not None and not req.hr_upscaler.strip():
        raise SdlabError("hires upscaler is empty; name one (e.g. 'Latent', see sdlab upscale --list) or leave it out")
    if req.hr_sampler_name:
        from .sampling.samplers import resolve_sampler

        resolve_sampler(req.hr_sampler_name)
    if req.hr_scheduler:
        from .sampling.schedules import resolve_schedule

        resolve_schedule(req.hr_scheduler)
    if req.width and req.height:
        size = request_target(req).size
        if size[0] < 8 or size[1] < 8:
            raise SdlabError(f"hires fix of {req.width}x{req.height} gives {size[0]}x{size[1]}; choose a larger "
                             "scale or resize")
        if max_pixels is not None and size[0] * size[1] > max_pixels:
            raise SdlabError(f"hires fix makes {size[0]}x{size[1]}, more pixels than allowed ({max_pixels})")


def hires_infotext(req: GenerationRequest, sampler: str, schedule_label: str) -> dict[str, object]:
    """The infotext keys the web UI adds for the hires fix, each only where it applies. `sampler`
    and `schedule_label` are the first pass's (resolved); `Size` stays the first pass's."""
    if not req.enable_hr or req.init_image is not None:
        return {}
    from .sampling.samplers import resolve_sampler
    from .sampling.schedules import SCHEDULES

    params: dict[str, object] = {"Denoising strength": req.denoising_strength}
    if req.hr_resize_x == 0 and req.hr_resize_y == 0:
        params["Hires upscale"] = req.hr_scale
    else:
        params["Hires resize"] = f"{req.hr_resize_x}x{req.hr_resize_y}"
    if req.hr_second_pass_steps:
        params["Hires steps"] = req.hr_second_pass_steps
    if req.hr_upscaler is not None:
        params["Hires upscaler"] = req.hr_upscaler
    hr_sampler = resolve_sampler(req.hr_sampler_name or sampler)
    if hr_sampler.name != sampler:
        params["Hires sampler"] = hr_sampler.name
    hr_schedule = hr_schedule_name(req, hr_sampler.default_schedule)
    if SCHEDULES[hr_schedule].label != schedule_label:
        params["Hires schedule type"] = SCHEDULES[hr_schedule].label
    if req.hr_prompt and req.hr_prompt != req.prompt:
        params["Hires prompt"] = req.hr_prompt
    if req.hr_negative_prompt and req.hr_negative_prompt != req.negative_prompt:
        params["Hires negative prompt"] = req.hr_negative_prompt
    if req.hr_cfg is not None:
        params["Hires CFG Scale"] = req.hr_cfg  # Forge's key
    return params


def hr_schedule_name(req: GenerationRequest, sampler_default: str | None) -> str:
    """The second pass's schedule: `hr_scheduler`, else the first pass's request (the web UI
    copies `scheduler`); "automatic" is the hires sampler's own."""
    from .sampling.schedules import resolve_schedule

    name = resolve_schedule(req.hr_scheduler or req.schedule).name
    if name == "automatic":
        name = sampler_default or "automatic"
    return name
