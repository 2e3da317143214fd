"""`sdlab generate`, `sdlab img2img`, `sdlab inpaint` and `sdlab samplers`.

Each command builds one GenerationRequest and calls the same pipeline as the
Python API and the server."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SdlabError, UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PRESETS = {
    # SD-Turbo / SDXL-Turbo: adversarial diffusion distillation, sampled in 1-4 steps
    # without classifier-free guidance, on trailing timesteps.
    "turbo": {"steps": 1, "cfg_scale": 1.0, "sampler": "Euler a", "schedule": "sgm_uniform"},
}
# The same presets on flow models: SD3.5-large-turbo is sampled in 4 Euler steps without CFG (the
# SD3.5 reference's config), on the "normal" schedule (the reference's and diffusers').
FLOW_PRESETS = {"turbo": {"steps": 4, "cfg_scale": 1.0, "sampler": "Euler", "schedule": "normal"}}


def _int_tuple(text: str) -> tuple[int, ...]:
    """"7,8,9" -> (7, 8, 9)."""
    try:
        return tuple(int(v) for v in text.replace(" ", "").strip("[]()").split(",") if v)
    except ValueError:
        raise ValueError(f"{text!r} is not a list of layer numbers such as 7,8,9") from None

# CLI flag -> request field, for everything a PNG's infotext can also give.
_INFOTEXT_FIELDS = {
    "Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("schedule", str),
    "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Size-1": ("width", int), "Size-2": ("height", int),
    "Clip skip": ("clip_skip", int), "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float), "Denoising strength": ("denoising_strength", float),
    "CFG rescale phi": ("guidance_rescale", float), "Mask blur": ("mask_blur", float),
    "Eta": ("eta", float), "Eta DDIM": ("eta", float), "Refiner switch at": ("refiner_switch_at", float),
    "Shift": ("shift", float),  # SD3's flow shift, written when not the model's own
    "SLG layers": ("slg_layers", _int_tuple), "SLG scale": ("slg_scale", float), "SLG start": ("slg_start", float),
    "SLG end": ("slg_end", float),
    # the hires fix's (`hires.hires_infotext`)
    "Hires upscale": ("hr_scale", float), "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str), "Hires sampler": ("hr_sampler_name", str),
    "Hires schedule type": ("hr_scheduler", str), "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str), "Hires CFG Scale": ("hr_cfg", float),
    # sdlab's own keys (`Pipeline.replay_infotext`)
    "sdlab aesthetic score": ("aesthetic_score", float),
    "sdlab negative aesthetic score": ("negative_aesthetic_score", float),
}
# sdlab's own keys whose values are written as the CLI takes them (WxH, LEFTxTOP).
_INFOTEXT_SIZES = {"sdlab original size": "original_size", "sdlab target size": "target_size",
                   "sdlab crop": "crop_top_left"}


def _add_common(p: argparse.ArgumentParser, prompt_required: bool = True) -> None:
    p.add_argument("prompt", nargs=None if prompt_required else "?", default=None,
                   help="what to draw; the web UIs' syntax works: (word:1.2), [from:to:when], BREAK")
    p.add_argument("-n", "--negative", dest="negative_prompt", default=None, help="what to avoid")
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint file, diffusers folder, hub repo id, a name in the models folder, or demo "
                        "(default: demo, the built-in demo model; a file, folder or models-folder checkpoint "
                        "named demo comes first)")
    p.add_argument("--models-dir", default=None, help="models folder (default: $SDLAB_MODELS_DIR or ./models)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--sampler", default=None,
                   help="sampler name, e.g. 'Euler a', 'DPM++ 2M' (see 'sdlab samplers'; default Euler a)")
    p.add_argument("--schedule", default=None, help="schedule type: automatic, karras, exponential, sgm_uniform, ... "
                                                    "(default automatic: the sampler's own)")
    p.add_argument("--cfg", dest="cfg_scale", type=float, default=None, help="CFG scale (default 7)")
    p.add_argument("--seed", type=int, default=None, help="seed; -1 for a random one (default)")
    p.add_argument("--variation-seed", dest="subseed", type=int, default=None,
                   help="variation seed; -1 for a random one (default)")
    p.add_argument("--variation-strength", dest="subseed_strength", type=float, default=None,
                   help="how much of the variation seed's noise to blend in (0..1, default 0)")
    p.add_argument("-W", "--width", type=int, default=None,
                   help="width in pixels, a multiple of 8 (default: the model's size, e.g. 512 for SD 1.5, 1024 for "
                        "SDXL, 64 for the demo model; img2img and inpaint: the init image's)")
    p.add_argument("-H", "--height", type=int, default=None,
                   help="height in pixels, a multiple of 8 (default: as for --width)")
    p.add_argument("--batch", dest="batch_size", type=int, default=None,
                   help="images per batch, made together (default 1)")
    p.add_argument("--count", dest="n_iter", type=int, default=None, help="number of batches, one after another "
                                                                         "(default 1)")
    p.add_argument("--clip-skip", type=int, default=None, help="CLIP skip (default 1: the last layer)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="CFG rescale phi (0..1, default 0: off)")
    p.add_argument("--rng", choices=["cpu", "nv"], default=None,
                   help="noise source: cpu (default, same on every device) or nv (what CUDA gives for a seed)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="turbo: 1 step, CFG 1, Euler a, SGM uniform (SD-Turbo models)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="override the model's prediction type (default: as its file says, or detected)")
    p.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                   help="sample on the noise schedule rescaled to zero terminal SNR, for models trained on it "
                        "(default: as the model's file says, e.g. NoobAI-XL v-pred's 'ztsnr' marker)")
    _add_sd3(p)
    from .controlnet_cli import add_control_flags

    add_control_flags(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 for the UNet and text encoder "
                   "(default: fp16 on a GPU; on a CPU bf16 where it has AVX512-BF16/AMX, else fp32; "
                   "see sdlab info --device)")
    p.add_argument("--weight-dtype", default=None,
                   help="keep the UNet's and text encoder's matrices in this dtype and upcast each layer as it runs: "
                        "fp16, bf16, fp8_e4m3fn, fp8_e5m2 or fp32 (default: fp16 on a CPU computing in fp32, which "
                        "halves their memory; otherwise as --dtype). fp8 lets SDXL fit small GPUs")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: faster steps after a first image that compiles (minutes on a CPU)")
    p.add_argument("--offload", action="store_true",
                   help="keep models in CPU memory and move each to the GPU only while it runs (small GPUs)")
    p.add_argument("--vae", default=None,
                   help="a separate VAE file (path, or a name in the models folder's VAE/) replacing the model's; "
                        "SD3.5 files carry none: give SD3's 16-channel VAE")
    p.add_argument("--refiner", default=None,
                   help="SDXL refiner checkpoint: it samples the steps after --refiner-switch")
    p.add_argument("--refiner-switch", dest="refiner_switch_at", type=float, default=None,
                   help="fraction of the steps after which the refiner takes over (default 0.8)")
    p.add_argument("--original-size", type=_size, default=None, metavar="WxH",
                   help="SDXL size conditioning: the 'original' image size (default: the output size)")
    p.add_argument("--target-size", type=_size, default=None, metavar="WxH",
                   help="SDXL size conditioning: the target size (default: the output size)")
    p.add_argument("--crop", dest="crop_top_left", type=_size, default=None, metavar="LEFTxTOP",
                   help="SDXL crop conditioning, top-left corner (default 0x0)")
    p.add_argument("--aesthetic-score", type=float, default=None, help="SDXL refiner aesthetic score (default 6)")
    p.add_argument("--style", dest="styles", action="append", default=None, metavar="NAME",
                   help="a saved prompt style to merge into the prompts (repeatable; the web UI's styles.csv, see "
                        "--styles-file)")
    p.add_argument("--styles-file", default=None,
                   help="the styles.csv --style names come from (default: styles.csv in the models folder)")
    p.add_argument("--tiling", action="store_true", default=None,
                   help="make a seamless image that tiles (circular padding in the UNet and VAE)")
    p.add_argument("--from", dest="from_image", default=None,
                   help="take the parameters from a PNG's infotext (flags given here override them)")
    p.add_argument("-o", "--output", default="outputs", help="a .png file, or a folder (default: ./outputs)")


# --hires-* flag -> request field; any of them turns the hires fix on.
_HIRES_FLAGS = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_sampler_name", "hr_scheduler", "hr_prompt",
                "hr_negative_prompt", "hr_cfg", "hr_checkpoint_name")


def _add_sd3(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SD3 / SD3.5")
    g.add_argument("--shift", type=float, default=None, help="flow sampling shift (default: the model's, 3)")
    g.add_argument("--clip-l", default=None, help="CLIP-L file (default: the checkpoint's, else models/text_encoders)")
    g.add_argument("--clip-g", default=None, help="CLIP-G file (default: the checkpoint's, else models/text_encoders)")
    g.add_argument("--t5", default=None, help="T5-XXL file, fp16 or fp8 (default: the checkpoint's, else "
                   "models/text_encoders; none: CLIP-L and CLIP-G alone)")
    g.add_argument("--t5-max-length", type=int, default=77,
                   help="T5 tokens per prompt chunk (default 77 as the reference and ComfyUI; diffusers uses 256)")
    g.add_argument("--slg-layers", type=_int_tuple, default=None, metavar="7,8,9",
                   help="skip-layer guidance (SD3.5-medium): joint blocks to leave out of its extra pass "
                   "(default: none, no SLG)")
    g.add_argument("--slg-scale", type=float, default=None, help="skip-layer guidance scale (default 2.8)")
    g.add_argument("--slg-start", type=float, default=None, help="SLG from this fraction of the steps (default 0.01)")
    g.add_argument("--slg-end", type=float, default=None, help="SLG until this fraction of the steps (default 0.2)")


def _add_hires(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hires fix", "a second pass at a larger size from the upscaled first pass, as the "
                                          "web UI's; any of these turns it on (Size in the infotext stays the first "
                                          "pass's)")
    g.add_argument("--hires", dest="enable_hr", action="store_true", default=None,
                   help="turn the hires fix on with its defaults (2x, Latent, denoise 0.75)")
    g.add_argument("--hires-scale", dest="hr_scale", type=float, default=None,
                   help="upscale by this factor (default 2)")
    g.add_argument("--hires-resize", dest="hr_resize", type=_size, default=None, metavar="WxH",
                   help="upscale to this size instead; one side 0 keeps the aspect ratio, both crop the centre "
                        "(default: by --hires-scale)")
    g.add_argument("--hires-upscaler", dest="hr_upscaler", default=None,
                   help="'Latent' (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic "
                        "antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', or an image upscaler "
                        "(Lanczos, Nearest, a model in the models folder: see sdlab upscale --list)")
    g.add_argument("--hires-steps", dest="hr_second_pass_steps", type=int, default=None,
                   help="steps of the second pass (default 0: as --steps); they run as the last steps of a "
                        "schedule of int(steps / denoise) steps")
    g.add_argument("--hires-denoise", dest="hr_denoise", type=float, default=None,
                   help="denoising strength of the second pass (default 0.75)")
    g.add_argument("--hires-sampler", dest="hr_sampler_name", default=None, help="sampler (default: --sampler's)")
    g.add_argument("--hires-schedule", dest="hr_scheduler", default=None, help="schedule type (default: --schedule's)")
    g.add_argument("--hires-prompt", dest="hr_prompt", default=None, help="prompt (default: the prompt)")
    g.add_argument("--hires-negative", dest="hr_negative_prompt", default=None,
                   help="negative prompt (default: the negative prompt)")
    g.add_argument("--hires-cfg", dest="hr_cfg", type=float, default=None, help="CFG scale (default: --cfg's)")
    g.add_argument("--hires-checkpoint", dest="hr_checkpoint_name", default=None,
                   help="only 'Use same checkpoint' is supported (default: the same checkpoint)")


def _hires_fields(args: argparse.Namespace) -> dict:
    """The request fields of the --hires-* flags given (none for img2img / inpaint)."""
    fields = {name: getattr(args, name) for name in _HIRES_FLAGS if getattr(args, name, None) is not None}
    if getattr(args, "hr_resize", None) is not None:
        fields["hr_resize_y"], fields["hr_resize_x"] = args.hr_resize
    if getattr(args, "hr_denoise", None) is not None:
        fields["denoising_strength"] = args.hr_denoise
    if fields or getattr(args, "enable_hr", None):
        fields["enable_hr"] = True
    return fields


def _size(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W), the (height, width) order SDXL's conditioning uses."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1024x1024, got {text!r}") from None
    return h, w


def register(sub) -> None:
    p = sub.add_parser("generate", help="text to image",
                       description="Generate images from a prompt and save them as PNGs with their parameters.")
    _add_common(p, prompt_required=False)
    _add_hires(p)
    p.set_defaults(func=cmd_generate, mode="txt2img")

    p = sub.add_parser("img2img", help="image to image",
                       description="Redraw an image guided by a prompt; --strength sets how much changes.")
    _add_common(p, prompt_required=False)
    p.add_argument("--init", required=True, help="the starting image")
    p.add_argument("--strength", dest="denoising_strength", type=float, default=None,
                   help="denoising strength 0..1 (default 0.75): steps x strength steps are run")
    p.add_argument("--resize-mode", dest="resize_mode", type=int, choices=range(4), default=None,
                   help="how the image is fitted to -W x -H, as the web UI's: 0 just resize (default), 1 crop and "
                        "resize, 2 resize and fill, 3 just resize (latent upscale)")
    p.set_defaults(func=cmd_generate, mode="img2img")

    p = sub.add_parser("inpaint", help="repaint the masked part of an image",
                       description="Repaint the white part of --mask in --init. Inpainting checkpoints "
                                   "(9 input channels) give the best results; ordinary ones work too.")
    _add_common(p, prompt_required=False)
    p.add_argument("--init", required=True, help="the image to repaint")
    p.add_argument("--mask", required=True, help="white = repaint, black = keep; resized to the image's size "
                                                 "when it differs, as the web UI does")
    p.add_argument("--mask-blur", type=float, default=None, help="soften the mask edge by this radius (default 4)")
    p.add_argument("--strength", dest="denoising_strength", type=float, default=None,
                   help="denoising strength 0..1 (default 1)")
    p.add_argument("--only-masked", dest="inpaint_full_res", action="store_true", default=None,
                   help="generate only the masked region (plus padding) at full resolution, then paste it back")
    p.add_argument("--padding", dest="inpaint_full_res_padding", type=int, default=None,
                   help="pixels around the mask with --only-masked (default 32)")
    p.add_argument("--invert-mask", dest="inpainting_mask_invert", action="store_true", default=None,
                   help="repaint the black part instead")
    p.set_defaults(func=cmd_generate, mode="inpaint")

    p = sub.add_parser("outpaint", help="extend an image's canvas and paint the new area",
                       description="Pad IMAGE on the sides given and inpaint the new area, blending into the "
                                   "image over a feathered edge (ComfyUI's ImagePadForOutpaint mask). Inpainting "
                                   "checkpoints give the best results.")
    p.add_argument("init", metavar="IMAGE", help="the image to extend")
    _add_common(p, prompt_required=False)
    for side in ("left", "top", "right", "bottom"):
        p.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side} (default 0)")
    p.add_argument("--feather", type=int, default=40,
                   help="pixels over which the mask fades into the image from each padded side (default 40)")
    p.add_argument("--fill", choices=["edge", "noise", "solid"], default="edge",
                   help="what the new area starts as: edge pixels stretched (default), noise, or solid grey")
    p.add_argument("--mask-blur", type=float, default=None, help="blur the mask edge by this radius (default 0)")
    p.add_argument("--strength", dest="denoising_strength", type=float, default=None,
                   help="denoising strength 0..1 (default 1)")
    p.set_defaults(func=cmd_generate, mode="outpaint")

    p = sub.add_parser("samplers", help="list samplers and schedule types",
                       description="List the sampler names and schedule types sdlab accepts.")
    p.set_defaults(func=cmd_samplers)


def cmd_samplers(args: argparse.Namespace) -> None:
    from .sampling.samplers import SAMPLERS
    from .sampling.schedules import SCHEDULES

    print("Samplers:")
    width = max(len(info.name) for info in SAMPLERS.values())
    for info in SAMPLERS.values():
        extra = f"aliases: {', '.join(info.aliases)}" if info.aliases else ""
        print(f"  {info.name:<{width}}  {extra}".rstrip())
    print("Schedule types (the name --schedule takes, then the web UI's label):")
    width = max(len(info.name) for info in SCHEDULES.values())
    for info in SCHEDULES.values():
        print(f"  {info.name:<{width}}  {info.label}")


def request_fields_from_infotext(text: str) -> dict:
    """GenerationRequest fields from an infotext (what `--from` and the API's `infotext` use)."""
    from .infotext import parse_infotext

    params = parse_infotext(text)
    fields: dict = {"prompt": params.get("Prompt", ""), "negative_prompt": params.get("Negative prompt", "")}
    for key, (name, cast) in _INFOTEXT_FIELDS.items():
        if key in params:
            try:
                fields[name] = cast(params[key])
            except ValueError:
                raise SdlabError(f"the infotext's {key!r} value {params[key]!r} is not a number") from None
    for key, name in _INFOTEXT_SIZES.items():
        if key in params:
            try:
                fields[name] = _size(params[key])
            except argparse.ArgumentTypeError:
                raise SdlabError(f"the infotext's {key!r} value {params[key]!r} is not WIDTHxHEIGHT") from None
    if params.get("Noise Schedule") == "Zero Terminal SNR":  # "Default": as the model says
        fields["zero_terminal_snr"] = True
    elif params.get("sdlab zero terminal SNR") == "off":  # turned off for a model marked for it
        fields["zero_terminal_snr"] = False
    if params.get("Tiling") == "True":  # the web UI writes the key only when on
        fields["tiling"] = True
    if "Hires resize" in params:
        try:
            fields["hr_resize_y"], fields["hr_resize_x"] = _size(params["Hires resize"])
        except argparse.ArgumentTypeError:
            raise SdlabError(f"the infotext's 'Hires resize' value {params['Hires resize']!r} is not "
                             "WIDTHxHEIGHT") from None
    if "Hires upscale" in params or "Hires resize" in params:  # the web UI writes one of them with hires fix
        fields["enable_hr"] = True
    # The web UI's default noise is the GPU's; on NVIDIA cards that is what "nv" reproduces.
    fields["rng"] = {"CPU": "cpu", "NV": "nv", "GPU": "nv"}.get(params.get("RNG", "GPU"), "nv")
    return fields


@dataclass(frozen=True)
class Replay:
    """What `--from` takes from a PNG besides the request's fields: how the model ran (sdlab's
    own infotext keys, `Pipeline.replay_infotext`; None where the infotext does not say, as in
    the web UIs' PNGs) and where the image sat in its batch."""

    dtype: torch.dtype | None = None  # the UNet's and text encoders' compute dtype
    weight_dtype: torch.dtype | None = None  # their weights' storage, where narrower
    vae_dtype: torch.dtype | None = None  # where it is not the one the compute dtype gives
    prediction: str | None = None  # where `--prediction` chose it
    batch_size: int = 1
    batch_pos: int = 0


def replay_settings(text: str) -> Replay:
    """The `Replay` an infotext records. Errors name the key whose value is wrong."""
    from .device import parse_dtype, parse_weight_dtype
    from .infotext import parse_infotext

    params = parse_infotext(text)

    def read(key: str, parse):
        if key not in params:
            return None
        try:
            return parse(params[key])
        except (SdlabError, ValueError):
            raise SdlabError(f"the infotext's {key!r} value {params[key]!r} is not one sdlab writes; "
                             f"remove it, or give the setting as a flag") from None

    def prediction(value: str) -> str:
        if value not in ("eps", "v"):
            raise ValueError(value)
        return value

    size, pos = read("sdlab batch size", int), read("sdlab batch pos", int)
    if size is not None and not 0 <= (pos or 0) < size:
        raise SdlabError(f"the infotext's 'sdlab batch pos' {pos} is outside its batch of {size}; remove both keys")
    return Replay(dtype=read("sdlab dtype", parse_dtype), weight_dtype=read("sdlab weights", parse_weight_dtype),
                  vae_dtype=read("sdlab VAE dtype", parse_dtype), prediction=read("sdlab prediction", prediction),
                  batch_size=size or 1, batch_pos=pos or 0)


def cmd_generate(args: argparse.Namespace) -> None:
    from . import load
    from .device import parse_dtype, parse_weight_dtype
    from .images import open_image
    from .request import GenerationRequest, check_request

    fields: dict = {}
    replay = Replay()
    if args.from_image:
        from .infotext import read_infotext

        text = read_infotext(open_image(args.from_image, "PNG"))
        if not text:
            raise SdlabError(f"{args.from_image}: has no generation parameters (no 'parameters' text)")
        fields.update(request_fields_from_infotext(text))
        replay = replay_settings(text)
    if args.preset:
        fields.update(PRESETS[args.preset])
    names = ("prompt", "negative_prompt", "steps", "sampler", "schedule", "cfg_scale", "seed", "subseed",
             "subseed_strength", "width", "height", "batch_size", "n_iter", "clip_skip", "guidance_rescale", "rng",
             "denoising_strength", "mask_blur", "inpaint_full_res", "inpaint_full_res_padding",
             "inpainting_mask_invert", "refiner_switch_at", "original_size", "target_size", "crop_top_left",
             "aesthetic_score", "zero_terminal_snr", "styles", "tiling", "shift", "slg_layers", "slg_scale",
             "slg_start", "slg_end", "resize_mode")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    fields.update(_hires_fields(args))
    # An image made in a batch is made again in that batch and picked out of it, unless flags
    # ask for other seeds or another batch.
    pick = None
    if replay.batch_size > 1 and fields.get("seed", -1) >= replay.batch_pos and all(
            getattr(args, name) is None for name in ("seed", "subseed", "batch_size", "n_iter")):
        pick = replay.batch_pos
        fields.update(batch_size=replay.batch_size, seed=fields["seed"] - pick)
        if "subseed" in fields:
            fields["subseed"] -= pick
    if not fields.get("prompt") and not args.from_image:
        raise SdlabError("give a prompt, e.g. sdlab generate \"a red circle on a blue background\"")
    if args.mode in ("img2img", "inpaint", "outpaint"):
        fields["init_image"] = open_image(args.init, "init image")
    if args.mode == "inpaint":
        fields["mask"] = open_image(args.mask, "mask")
        fields.setdefault("denoising_strength", 1.0)
    if args.mode == "outpaint":
        from .recipes.outpaint import outpaint_request

        fields.setdefault("denoising_strength", 1.0)
        fields.setdefault("mask_blur", 0)
        fields.pop("width", None), fields.pop("height", None)  # the canvas's size
        request = outpaint_request(GenerationRequest(**{k: v for k, v in fields.items() if k != "init_image"}),
                                   fields["init_image"], args.left, args.top, args.right, args.bottom, args.feather,
                                   args.fill)
        fields.update(init_image=request.init_image, mask=request.mask, width=request.width, height=request.height,
                      inpaint_full_res=False)

    # Everything that needs no model is checked before one loads, so a typo costs no load.
    models = _models_dir(args)
    units = args.controls
    replay_images = getattr(args, "replay_control_images", None)
    if not units and (args.from_image or replay_images):
        # --from replays the PNG's ControlNet units; --control units given here replace them.
        from .controlnet_cli import replayed_units

        if replay_images and not args.from_image:
            raise UsageError("--control-image without --control: give --control MODEL before it (or --from a PNG "
                             "whose ControlNet lines it is for)")
        units = replayed_units(text, replay_images, init="init_image" in fields)
    elif replay_images:
        raise UsageError("--control-image given before the first --control; put each after its --control MODEL")
    if units:
        from .controlnet_cli import control_requests

        fields["controls"] = control_requests(units, models.root, init="init_image" in fields)
    request = GenerationRequest(**fields)
    check_request(request, models)
    model = _resolve_model(args, args.model)
    refiner_model = _resolve_model(args, args.refiner) if args.refiner else None
    vae_path = _vae_path(args.vae, models) if args.vae else None
    dtype, weight_dtype = parse_dtype(args.dtype), parse_weight_dtype(args.weight_dtype)
    if dtype is None and replay.dtype is not None:
        # The PNG's precision, unless --dtype names one (which then sets the weights too, as it
        # does without --from). Not narrow weights with --compile, which cannot trace them.
        dtype = replay.dtype
        if weight_dtype is None and not args.compile:
            weight_dtype = replay.weight_dtype
        _warn_if_emulated(args, dtype)
    pipe = load(model, device=args.device, dtype=dtype, prediction=args.prediction or replay.prediction,
                models_dir=args.models_dir, compile=args.compile, offload=args.offload, weight_dtype=weight_dtype,
                text_encoder_files={"clip_l": args.clip_l, "clip_g": args.clip_g, "t5xxl": args.t5},
                t5_max_length=args.t5_max_length, vae=vae_path)
    if args.preset in FLOW_PRESETS and pipe.bundle.family.is_flow:  # flags still win
        request = replace(request, **{k: v for k, v in FLOW_PRESETS[args.preset].items() if getattr(args, k) is None})
    if args.styles_file:
        pipe.styles_file = Path(args.styles_file)
    if refiner_model is not None:
        from .models.storage import storage_dtype
        from .perf import load_for_inference

        refiner = load_for_inference(refiner_model, pipe.bundle.device, pipe.bundle.dtype,
                                     compile=args.compile, offload=args.offload,
                                     weight_dtype=storage_dtype(pipe.bundle.unet))
        pipe.set_refiner(refiner)
        request = replace(request, refiner_checkpoint=refiner.name)
    if replay.vae_dtype is not None and args.dtype is None:
        pipe.bundle.vae.to(dtype=replay.vae_dtype)  # it had overflowed fp16 before this image
    result = _run_with_progress(pipe, request)
    if pick is not None and pick < len(result.images):
        result = replace(result, images=[result.images[pick]], infotexts=[result.infotexts[pick]],
                         seeds=[result.seeds[pick]], subseeds=[result.subseeds[pick]])
    for path in save_images(result, Path(args.output)):
        print(path)
    if result.interrupted:
        raise SdlabError("interrupted; the images so far were saved")


def _warn_if_emulated(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Say why a replay runs in a dtype this CPU emulates (a PNG made on a GPU in fp16, say)."""
    from .device import choose_device, dtype_name, emulated_cpu_dtype_warning

    if choose_device(args.device).type == "cpu" and emulated_cpu_dtype_warning(dtype) is not None:
        log.warning("%s was made in %s, which this CPU runs emulated (slowly); --from keeps it for the same "
                    "pixels: add --dtype fp32 to run faster", args.from_image, dtype_name(dtype))


def _resolve_model(args: argparse.Namespace, name: str | None) -> str | None:
    """A model named on the command line: a file or folder here, a checkpoint in the models
    folder, `demo` (the built-in model) or a hub repo id, in that order. Anything else fails
    here, before a model loads."""
    from .checkpoints.loader import looks_like_repo_id
    from .demo_model import builtin_model

    if name is None or Path(name).expanduser().exists():
        return name
    try:
        return str(_models_dir(args).resolve_checkpoint(name))
    except SdlabError as e:
        if builtin_model(name) is not None or looks_like_repo_id(name):
            return name
        raise SdlabError(f"{name}: no such file or folder; {e}") from None


def _vae_path(name: str, models) -> Path:
    """--vae: a file, else a name in the models folder's VAE/."""
    path = Path(name).expanduser()
    return path if path.is_file() else models.resolve_vae(name)


def _models_dir(args: argparse.Namespace):
    from .models_dir import ModelsDir

    return ModelsDir(args.models_dir) if args.models_dir else ModelsDir()


def _run_with_progress(pipe, request):
    from tqdm import tqdm

    bar = None

    def on_progress(p) -> None:
        nonlocal bar
        if bar is None or p.step == 1:
            if bar is not None:
                bar.close()
            desc = f"batch {p.batch + 1}/{p.batches}" if p.batches > 1 else "sampling"
            bar = tqdm(total=p.total, desc=desc, unit="step", leave=False)
        bar.update(p.step - bar.n)

    try:
        return pipe.generate(request, on_progress)
    finally:
        if bar is not None:
            bar.close()


def save_images(result, output: Path) -> list[Path]:
    """Write PNGs (atomically) with their infotext: to `output` if it names a .png and there
    is one image, else into the folder as NNNNN-SEED.png, numbered after what is there (the
    server's `save_images` naming, `outputs.save_image`)."""
    from .checkpoints.io import atomic_write
    from .infotext import png_info
    from .outputs import save_image

    if output.suffix.lower() == ".png" and len(result.images) == 1:
        image, text = result.images[0], result.infotexts[0]
        atomic_write(output, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(text)))
        return [output]
    folder = output.with_suffix("") if output.suffix.lower() == ".png" else output
    return [save_image(image, folder, seed, text) for image, text, seed in zip(result.images, result.infotexts, result.seeds)]
