"""Between the web UI's request/response shapes and sdlab's own `GenerationRequest` /
`GenerationResult`. No generation logic lives here: only names, defaults, limits and
encodings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from .._version import __version__
from ..errors import SdlabError
from ..infotext import parse_infotext
from ..recipes.sd3 import sd3_infotext_fields
from ..request import GenerationRequest, validate
from ..sampling.samplers import SAMPLERS, resolve_sampler
from ..sampling.schedules import SCHEDULES, resolve_schedule
from ..styles import apply_styles
from .catalog import CheckpointEntry
from .errors import BadInput, OverLimit, Unsupported
from .models import GenerationFields, Img2ImgRequest, Txt2ImgRequest
from .images import decode_image
from .settings import Limits
from .state import (LOAD_OPTIONS, RANDN_SOURCES, ServerState, bool_option, clip_skip_value, noise_schedule_value,
                    randn_source_value)
from .worker import JobResult


@dataclass(frozen=True)
class NotActedOn:
    """A request field of a feature sdlab does not have (yet). A request that turns it on is
    refused (422, naming the field): an image made without the feature must never pass for
    one made with it. Every other field of the request models is acted on, and
    tests/server/test_api.py's ACTED_ON names the test that shows it."""

    feature: str  # what the client asked for, for the message
    off: tuple[Any, ...]  # values that mean "off" (the field's default is one): these pass
    # The field that turns the feature on. Without it this field has no effect in the web UI
    # either, so any value passes: webuiapi sends hr_upscaler="Latent" with enable_hr false.
    only_with: str | None = None
    instead: str | None = None  # a way to get what the client wanted, if there is one


NOT_ACTED_ON: dict[str, NotActedOn] = {
    # The web UI reads these only with seed_enable_extras (its default); -1 and 0 are "off" there.
    "seed_resize_from_h": NotActedOn("seed resize", (-1, 0), only_with="seed_enable_extras"),
    "seed_resize_from_w": NotActedOn("seed resize", (-1, 0), only_with="seed_enable_extras"),
    "restore_faces": NotActedOn("face restoration", (None, False)),
    "s_min_uncond": NotActedOn("negative guidance minimum sigma", (None, 0)),
    "s_churn": NotActedOn("sigma churn", (None, 0)),
    # The web UI reads these two only with churn; s_tmax 0 means "no limit" there.
    "s_tmin": NotActedOn("sigma churn", (None, 0), only_with="s_churn"),
    "s_tmax": NotActedOn("sigma churn", (None, 0), only_with="s_churn"),
    "s_noise": NotActedOn("sigma noise", (None, 1)),
    "override_settings_restore_afterwards": NotActedOn(
        "keeping override_settings after the request", (True,), only_with="override_settings",
        instead="set them with POST /sdapi/v1/options"),
    "refiner_checkpoint": NotActedOn("the SDXL refiner on the server", (None, "", "None"),
                                     instead="use sdlab generate --refiner"),
    "refiner_switch_at": NotActedOn("the SDXL refiner on the server", (None,), only_with="refiner_checkpoint"),
    "comments": NotActedOn("comments", (None, {})),
    "force_task_id": NotActedOn("task ids (the web UI's /internal/progress)", (None, ""),
                                instead="poll GET /sdapi/v1/progress"),
    # The scripts of server/scripts.py are acted on; any other script is refused.
    "script_name": NotActedOn("scripts", (None, "", "None")),
    "script_args": NotActedOn("scripts", ([],), only_with="script_name"),
}
TXT2IMG_NOT_ACTED_ON: dict[str, NotActedOn] = {
    # The hires fix is acted on (`_hires_fields`); these of its fields are not. They mean nothing
    # while enable_hr is false, in the web UI too.
    "firstphase_width": NotActedOn("the legacy hires fix first-pass size", (0,), only_with="enable_hr",
                                   instead="send the first-pass width/height and hr_resize_x/hr_resize_y"),
    "firstphase_height": NotActedOn("the legacy hires fix first-pass size", (0,), only_with="enable_hr",
                                    instead="send the first-pass width/height and hr_resize_x/hr_resize_y"),
    "firstpass_image": NotActedOn("a hires fix from a given first-pass image", (None, ""), only_with="enable_hr",
                                  instead="upscale the image and send it to img2img"),
    "hr_checkpoint_name": NotActedOn("a second checkpoint for the hires pass", (None, "", "Use same checkpoint"),
                                     only_with="enable_hr"),
}
IMG2IMG_NOT_ACTED_ON: dict[str, NotActedOn] = {
    "initial_noise_multiplier": NotActedOn("the initial noise multiplier", (None, 1)),
    "mask_round": NotActedOn("an unrounded latent mask", (True,), only_with="mask"),
}


def not_acted_on(model: type[GenerationFields]) -> dict[str, NotActedOn]:
    """The fields of a request model that sdlab refuses unless they are off."""
    extra = TXT2IMG_NOT_ACTED_ON if issubclass(model, Txt2ImgRequest) else IMG2IMG_NOT_ACTED_ON
    return {**NOT_ACTED_ON, **extra}


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def refuse_not_acted_on(body: Txt2ImgRequest | Img2ImgRequest) -> None:
    """Raise `Unsupported` naming every field that asks for something sdlab does not do."""
    table = not_acted_on(type(body))

    problems = []
    for name, rule in table.items():
        value = getattr(body, name)
        if value in rule.off:
            continue
        # Without its switch the field does nothing, in the web UI too; with a switch that is
        # refused itself (enable_hr, s_churn, ...), the switch's message says it all.
        if rule.only_with is not None and (rule.only_with in table or not getattr(body, rule.only_with)):
            continue
        if name == "script_name":
            from .scripts import find, not_found

            kind = "img2img" if isinstance(body, Img2ImgRequest) else "txt2img"
            if find(value, kind) is not None:  # a script sdlab runs (server/scripts.py)
                continue
            problems.append(not_found(str(value), kind))
        else:
            default = type(body).model_fields[name].get_default(call_default_factory=True)
            problems.append(f"{name}={_json(value)}: {rule.feature} is not implemented by sdlab; send "
                            f"{_json(default)} or leave it out" + (f" ({rule.instead})" if rule.instead else ""))
    if isinstance(body, Img2ImgRequest):
        problems += _img2img_problems(body)
    if problems:
        raise Unsupported("; ".join(problems))


def _img2img_problems(body: Img2ImgRequest) -> list[str]:
    """Img2img fields of which sdlab acts on some values only."""
    problems = []
    if len(body.init_images) > 1:
        # The web UI makes one image per init image; sdlab takes one per request.
        problems.append(f"init_images: {len(body.init_images)} images, but sdlab uses one per request; "
                        "send one image per request")
    if body.mask:
        if body.mask_blur is None and body.mask_blur_x != body.mask_blur_y:
            problems.append(f"mask_blur_x={body.mask_blur_x}, mask_blur_y={body.mask_blur_y}: sdlab blurs the mask "
                            "evenly; send mask_blur (one value for both)")
        if body.inpainting_fill in (2, 3):
            problems.append(f"inpainting_fill={body.inpainting_fill}: latent noise / latent nothing is not "
                            "implemented by sdlab; send 1 (original)")
    return problems


# -- requests -----------------------------------------------------------------------------

@dataclass
class Prepared:
    """A request ready for the worker, and what to tell the client about it."""

    request: GenerationRequest
    checkpoint: CheckpointEntry | None
    notes: list[str] = field(default_factory=list)
    ignored_fields: list[str] = field(default_factory=list)
    sampler_name: str = ""
    # The prompts with the request's styles merged in, as the web UI's info reports them.
    styled_prompt: str = ""
    styled_negative_prompt: str = ""
    # ControlNet: for each unit of request.controls, whether its detected map is appended to images.
    control_maps: list[bool] = field(default_factory=list)
    # override_settings of the options a model is loaded with (sd_vae, fp8_storage): the job's.
    load_options: dict[str, Any] = field(default_factory=dict)


def _fill_from_infotext(body: GenerationFields) -> GenerationFields:
    """The web UI's `infotext` field: its values fill every field the request left unset."""
    params = parse_infotext(body.infotext or "")
    mapping = {"Prompt": "prompt", "Negative prompt": "negative_prompt", "Steps": "steps", "Sampler": "sampler_name",
               "Schedule type": "scheduler", "CFG scale": "cfg_scale", "Seed": "seed", "Size-1": "width",
               "Size-2": "height", "Variation seed": "subseed", "Variation seed strength": "subseed_strength",
               "Denoising strength": "denoising_strength", "Tiling": "tiling",
               # the hires fix's keys (txt2img)
               "Hires upscale": "hr_scale", "Hires steps": "hr_second_pass_steps", "Hires upscaler": "hr_upscaler",
               "Hires sampler": "hr_sampler_name", "Hires schedule type": "hr_scheduler", "Hires prompt": "hr_prompt",
               "Hires negative prompt": "hr_negative_prompt", "Hires CFG Scale": "hr_cfg"}
    update = {f: params[k] for k, f in mapping.items() if k in params and f not in body.model_fields_set
              and f in type(body).model_fields and params[k] != ""}
    if "enable_hr" in type(body).model_fields and "enable_hr" not in body.model_fields_set:
        if "Hires resize" in params:
            x, _, y = params["Hires resize"].partition("x")
            update.update({k: v for k, v in (("hr_resize_x", x), ("hr_resize_y", y)) if k not in body.model_fields_set})
        if "Hires upscale" in params or "Hires resize" in params:
            update["enable_hr"] = True
    given = body.model_fields_set | ({"shift"} if "schedulers_shift" in body.model_fields_set else set())
    update.update({f: v for f, v in sd3_infotext_fields(params).items() if f not in given})
    settings = {"CLIP_stop_at_last_layers": params.get("Clip skip"), "sd_noise_schedule": params.get("Noise Schedule")}
    settings = {k: v for k, v in settings.items() if v is not None and k not in body.override_settings}
    if settings:
        update["override_settings"] = {**body.override_settings, **settings}
    if not update:
        return body
    data = body.model_dump()
    data.update(update)
    try:
        return type(body).model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise SdlabError(f"infotext: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def sampler_of(body: GenerationFields) -> str:
    name = body.sampler_name or body.sampler_index
    if isinstance(name, int):
        names = list(SAMPLERS)
        if not 0 <= name < len(names):
            raise SdlabError(f"sampler_index {name} is out of range 0-{len(names) - 1}")
        return names[name]
    return name


def check_limits(body: GenerationFields, limits: Limits) -> None:
    pixels = body.width * body.height
    if pixels > limits.max_pixels:
        raise OverLimit(f"{body.width}x{body.height} is {pixels} pixels; this server allows at most "
                        f"{limits.max_pixels} (e.g. {int(limits.max_pixels ** 0.5) // 8 * 8}x"
                        f"{int(limits.max_pixels ** 0.5) // 8 * 8})")
    if body.steps > limits.max_steps:
        raise OverLimit(f"steps {body.steps} is more than this server allows ({limits.max_steps})")
    if body.batch_size * body.n_iter > limits.max_batch:
        raise OverLimit(f"batch_size x n_iter = {body.batch_size * body.n_iter} images; this server makes at "
                        f"most {limits.max_batch} per request")


def prepare(body: Txt2ImgRequest | Img2ImgRequest, state: ServerState) -> Prepared:
    """Check a request against the limits and translate it; raise on anything wrong."""
    limits = state.settings.limits
    if body.infotext:
        body = _fill_from_infotext(body)
    check_limits(body, limits)
    refuse_not_acted_on(body)
    # Keys no model declares pass with a note, as the web UI drops them silently: clients of
    # newer web UI versions and forks send fields of their own.
    notes, ignored = [], sorted(body.model_extra or {})
    for name in ignored:
        notes.append(f"unknown field {name!r} ignored")

    # Options: the server's, then this request's override_settings.
    checkpoint = state.selected
    clip_skip = state.option("CLIP_stop_at_last_layers")
    randn = state.option("randn_source")
    noise_schedule = state.option("sd_noise_schedule")
    no_detectmap = state.option("control_net_no_detectmap")
    load_options: dict[str, Any] = {}
    for key, value in body.override_settings.items():
        if key == "sd_model_checkpoint":
            checkpoint = state.catalog.find_checkpoint(str(value))
        elif key == "CLIP_stop_at_last_layers":
            clip_skip = clip_skip_value(value)
        elif key == "randn_source":
            randn = randn_source_value(value)
        elif key == "sd_noise_schedule":
            noise_schedule = noise_schedule_value(value)
        elif key == "control_net_no_detectmap":
            no_detectmap = bool_option(key, value)
        elif key in LOAD_OPTIONS:  # for this request's model: loaded with them, then as the options say
            load_options[key] = state.checked_option(key, value)
        else:
            notes.append(f"override_settings[{key!r}] is not an option sdlab has; ignored")

    sampler = sampler_of(body)
    schedule = body.scheduler or "automatic"
    prompt, negative = body.prompt, body.negative_prompt
    if body.disable_extra_networks:
        from ..text.prompt import extract_extra_networks

        prompt, negative = extract_extra_networks(prompt)[0], extract_extra_networks(negative)[0]
    gen = GenerationRequest(
        prompt=prompt, negative_prompt=negative, width=body.width, height=body.height, steps=body.steps,
        sampler=sampler, schedule=schedule, cfg_scale=body.cfg_scale, seed=body.seed, subseed=body.subseed,
        # Without the seed extras the web UI sets the variation strength to 0.
        subseed_strength=body.subseed_strength if body.seed_enable_extras else 0.0,
        batch_size=body.batch_size, n_iter=body.n_iter,
        clip_skip=clip_skip, rng=RANDN_SOURCES[randn], eta=body.eta,
        # "Default" leaves it to the model (its ztsnr marker), as the web UI does.
        zero_terminal_snr=True if noise_schedule == "Zero Terminal SNR" else None,
        # None is the web UI's "as the tiling setting says", off unless set; sdlab has no such setting.
        styles=list(body.styles or []), tiling=bool(body.tiling),
    )
    gen = _sd3_fields(body, gen)
    if isinstance(body, Img2ImgRequest):
        gen = _img2img_fields(body, gen, limits, notes)
    elif body.enable_hr:
        gen = _hires_fields(body, gen, state)
    units = []
    if body.alwayson_scripts:  # ControlNet units, the extension's way (the only always-on script sdlab has)
        from .controlnet import parse_alwayson_scripts

        units = parse_alwayson_scripts(body.alwayson_scripts, state.catalog.root, limits,
                                       enable_hr=bool(getattr(body, "enable_hr", False)),
                                       img2img=isinstance(body, Img2ImgRequest),
                                       unit_count=state.settings.control_net_unit_count)
        gen.controls = [u.control for u in units]
    # Resolve -1 seeds now, so the batches the worker runs and the info we return agree.
    gen = validate(gen, 512)
    sampler_info = resolve_sampler(sampler)
    resolve_schedule(schedule)
    # The pipeline merges the styles in; merged here too, so that a style missing from the file is
    # refused before the request waits in the queue, and for the info.
    styled = apply_styles(gen, state.styles_file)
    return Prepared(gen, checkpoint, notes, ignored, sampler_info.name, styled.prompt, styled.negative_prompt,
                    [u.save_detected_map and not no_detectmap for u in units], load_options)


def _sd3_fields(body: GenerationFields, gen: GenerationRequest) -> GenerationRequest:
    """SD3's fields (shift, skip-layer guidance); the pipeline refuses them on other families."""
    shift = body.shift if body.shift is not None else body.schedulers_shift  # SD.Next's name second
    return replace(gen, shift=shift, slg_layers=tuple(body.slg_layers or ()), slg_scale=body.slg_scale,
                   slg_start=body.slg_start, slg_end=body.slg_end)


def _hires_fields(body: Txt2ImgRequest, gen: GenerationRequest, state: ServerState) -> GenerationRequest:
    """The hires fix's fields; its final size and steps must fit the server's limits too."""
    from ..hires import check_hires, latent_mode, request_target, second_pass_steps

    limits = state.settings.limits
    gen = replace(gen, enable_hr=True, hr_scale=body.hr_scale, hr_resize_x=body.hr_resize_x,
                  hr_resize_y=body.hr_resize_y, hr_upscaler=body.hr_upscaler,
                  hr_second_pass_steps=body.hr_second_pass_steps, hr_sampler_name=body.hr_sampler_name or None,
                  hr_scheduler=body.hr_scheduler or None, hr_prompt=body.hr_prompt,
                  hr_negative_prompt=body.hr_negative_prompt, hr_cfg=body.hr_cfg,
                  denoising_strength=0.75 if body.denoising_strength is None else body.denoising_strength)
    check_hires(gen)
    w, h = request_target(gen).size
    if w * h > limits.max_pixels:
        raise OverLimit(f"hires fix of {gen.width}x{gen.height} makes {w}x{h}, {w * h} pixels; this server allows at "
                        f"most {limits.max_pixels}")
    if second_pass_steps(gen) > limits.max_steps:
        raise OverLimit(f"hires steps {second_pass_steps(gen)} is more than this server allows ({limits.max_steps})")
    if latent_mode(gen.hr_upscaler) is None:
        from ..upscalers import Upscalers

        try:
            Upscalers(state.catalog.root).find(gen.hr_upscaler)
        except SdlabError as e:
            raise BadInput(f"hr_upscaler: {e}") from None
    return gen


def _img2img_fields(body: Img2ImgRequest, gen: GenerationRequest, limits: Limits,
                    notes: list[str]) -> GenerationRequest:
    init = decode_image(body.init_images[0], "init_images[0]", limits)
    mask = decode_image(body.mask, "mask", limits) if body.mask else None
    if mask is not None and body.inpainting_fill == 0:
        # The web UI's default, so it cannot be refused; 2 and 3 are (refuse_not_acted_on).
        notes.append("inpainting_fill=0 (fill) is not implemented; sdlab starts from the original content (1)")
    blur = body.mask_blur if body.mask_blur is not None else body.mask_blur_x  # x == y, or refused
    gen.init_image = init
    gen.mask = mask
    gen.denoising_strength = body.denoising_strength
    gen.mask_blur = blur
    gen.inpaint_full_res = bool(body.inpaint_full_res)
    gen.inpaint_full_res_padding = body.inpaint_full_res_padding
    gen.inpainting_mask_invert = bool(body.inpainting_mask_invert)
    gen.resize_mode = body.resize_mode
    # Where the latent is repainted, if not the mask (the web UI's outpainting scripts send one);
    # without a mask it does nothing, in the web UI too.
    if mask is not None and body.latent_mask:
        gen.latent_mask = decode_image(body.latent_mask, "latent_mask", limits)
    return gen


# -- responses --------------------------------------------------------------------------------

def echo_parameters(body: BaseModel) -> dict[str, Any]:
    """The request as the web UI echoes it: images left out unless include_init_images."""
    data = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        data["init_images"] = None
        data["mask"] = None
    return data


def info_json(done: JobResult, prep: Prepared) -> str:
    """The web UI's `Processed.js()`, plus sdlab's notes."""
    res, req = done.result, prep.request
    n = len(res.images)
    bundle_name = done.checkpoint.model_name
    obj = {
        "prompt": prep.styled_prompt,
        "all_prompts": [prep.styled_prompt] * n,
        "negative_prompt": prep.styled_negative_prompt,
        "all_negative_prompts": [prep.styled_negative_prompt] * n,
        "seed": res.seeds[0] if res.seeds else req.seed,
        "all_seeds": res.seeds,
        "subseed": res.subseeds[0] if res.subseeds else req.subseed,
        "all_subseeds": res.subseeds,
        "subseed_strength": req.subseed_strength,
        "width": req.width,
        "height": req.height,
        "sampler_name": prep.sampler_name,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": bundle_name,
        "sd_model_hash": done.checkpoint.short_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": req.denoising_strength if req.init_image is not None or req.enable_hr else None,
        "extra_generation_params": _extra_params(req),
        "index_of_first_image": 0,
        "infotexts": res.infotexts,
        "styles": list(req.styles),
        "job_timestamp": prep_timestamp(),
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": f"sdlab {__version__}",
        # sdlab's additions; web UI clients ignore keys they do not know.
        "scheduler": SCHEDULES[resolve_schedule(req.schedule).name].label,
        "interrupted": done.interrupted,
        "steps_done": done.steps_done,
        "notes": prep.notes + done.notes,
        "ignored_fields": prep.ignored_fields,
        # save_images: the files written, relative to the server's outputs folder.
        "saved_images": done.saved,
    }
    return json.dumps(obj)


def _extra_params(req: GenerationRequest) -> dict[str, Any]:
    from ..hires import hires_infotext

    extra: dict[str, Any] = {}
    if req.enable_hr:
        sampler = resolve_sampler(req.sampler)
        schedule = resolve_schedule(req.schedule).name
        if schedule == "automatic":  # the sampler's own, as the pipeline resolves it
            schedule = sampler.default_schedule or "automatic"
        hires = hires_infotext(req, sampler.name, SCHEDULES[schedule].label)
        hires.pop("Denoising strength", None)  # a key of its own in info
        extra.update(hires)
    if req.mode == "inpaint":
        extra["Mask blur"] = req.mask_blur
        if req.inpaint_full_res:
            extra["Inpaint area"] = "Only masked"
            extra["Masked area padding"] = req.inpaint_full_res_padding
    return extra


def prep_timestamp() -> str:
    import time

    return time.strftime("%Y%m%d%H%M%S")
