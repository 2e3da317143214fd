"""`sdlab generate`, `sdlab img2img`, `sdlab inpaint` and `sdlab samplers`.

Each command builds one GenerationRequest and calls the same pipeline as the
Python API and the server."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import SdlabError

PRESETS = {
    # SD-Turbo / SDXL-Turbo: adversarial diffusion distillation, sampled in 1-4 steps
    # without classifier-free guidance, on trailing timesteps.
    "turbo": {"steps": 1, "cfg_scale": 1.0, "sampler": "Euler a", "schedule": "sgm_uniform"},
}

# CLI flag -> request field, for everything a PNG's infotext can also give.
_INFOTEXT_FIELDS = {
    "Steps": ("steps", int), "Sampler": ("sampler", str), "Schedule type": ("schedule", str),
    "CFG scale": ("cfg_scale", float), "Seed": ("seed", int), "Size-1": ("width", int), "Size-2": ("height", int),
    "Clip skip": ("clip_skip", int), "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float), "Denoising strength": ("denoising_strength", float),
    "CFG rescale phi": ("guidance_rescale", float), "Mask blur": ("mask_blur", float),
}


def _add_common(p: argparse.ArgumentParser, prompt_required: bool = True) -> None:
    p.add_argument("prompt", nargs=None if prompt_required else "?", default=None,
                   help="what to draw; the web UIs' syntax works: (word:1.2), [from:to:when], BREAK")
    p.add_argument("-n", "--negative", dest="negative_prompt", default=None, help="what to avoid")
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint file, diffusers folder, hub repo id, or a name in the models folder "
                        "(default: the built-in demo model)")
    p.add_argument("--models-dir", default=None, help="models folder (default: $SDLAB_MODELS_DIR or ./models)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20)")
    p.add_argument("--sampler", default=None, help="sampler name, e.g. 'Euler a', 'DPM++ 2M' (see 'sdlab samplers')")
    p.add_argument("--schedule", default=None, help="schedule type: automatic, karras, exponential, sgm_uniform, ...")
    p.add_argument("--cfg", dest="cfg_scale", type=float, default=None, help="CFG scale (default 7)")
    p.add_argument("--seed", type=int, default=None, help="seed; -1 for a random one (default)")
    p.add_argument("--variation-seed", dest="subseed", type=int, default=None, help="variation seed")
    p.add_argument("--variation-strength", dest="subseed_strength", type=float, default=None,
                   help="how much of the variation seed's noise to blend in (0..1)")
    p.add_argument("-W", "--width", type=int, default=None, help="width in pixels, a multiple of 8")
    p.add_argument("-H", "--height", type=int, default=None, help="height in pixels, a multiple of 8")
    p.add_argument("--batch", dest="batch_size", type=int, default=None, help="images per batch")
    p.add_argument("--count", dest="n_iter", type=int, default=None, help="number of batches")
    p.add_argument("--clip-skip", type=int, default=None, help="CLIP skip (1 = last layer)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="CFG rescale phi (0..1)")
    p.add_argument("--rng", choices=["cpu", "nv"], default=None,
                   help="noise source: cpu (default, same on every device) or nv (what CUDA gives for a seed)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="turbo: 1 step, CFG 1, Euler a, SGM uniform (SD-Turbo models)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="override the model's prediction type")
    p.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                   help="sample on the noise schedule rescaled to zero terminal SNR, for models trained on it "
                        "(default: as the model's file says, e.g. NoobAI-XL v-pred's 'ztsnr' marker)")
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
                   help="a separate VAE file (path, or a name in the models folder's VAE/) replacing the model's")
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
    p.add_argument("--from", dest="from_image", default=None,
                   help="take the parameters from a PNG's infotext (flags given here override them)")
    p.add_argument("-o", "--output", default="outputs", help="a .png file, or a folder (default: ./outputs)")


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
    p.set_defaults(func=cmd_generate, mode="txt2img")

    p = sub.add_parser("img2img", help="image to image",
                       description="Redraw an image guided by a prompt; --strength sets how much changes.")
    _add_common(p, prompt_required=False)
    p.add_argument("--init", required=True, help="the starting image")
    p.add_argument("--strength", dest="denoising_strength", type=float, default=None,
                   help="denoising strength 0..1 (default 0.75): steps x strength steps are run")
    p.set_defaults(func=cmd_generate, mode="img2img")

    p = sub.add_parser("inpaint", help="repaint the masked part of an image",
                       description="Repaint the white part of --mask in --init. Inpainting checkpoints "
                                   "(9 input channels) give the best results; ordinary ones work too.")
    _add_common(p, prompt_required=False)
    p.add_argument("--init", required=True, help="the image to repaint")
    p.add_argument("--mask", required=True, help="same size as the image; white = repaint, black = keep")
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

    p = sub.add_parser("samplers", help="list samplers and schedule types",
                       description="List the sampler names and schedule types sdlab accepts.")
    p.set_defaults(func=cmd_samplers)


def cmd_samplers(args: argparse.Namespace) -> None:
    from .sampling.samplers import SAMPLERS
    from .sampling.schedules import SCHEDULES

    print("Samplers:")
    for info in SAMPLERS.values():
        extra = f"  (aliases: {', '.join(info.aliases)})" if info.aliases else ""
        print(f"  {info.name}{extra}")
    print("Schedule types:")
    for info in SCHEDULES.values():
        print(f"  {info.name:<14} {info.label}")


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
    if params.get("Noise Schedule") == "Zero Terminal SNR":  # "Default": as the model says
        fields["zero_terminal_snr"] = True
    # The web UI's default noise is the GPU's; on NVIDIA cards that is what "nv" reproduces.
    fields["rng"] = {"CPU": "cpu", "NV": "nv", "GPU": "nv"}.get(params.get("RNG", "GPU"), "nv")
    return fields


def cmd_generate(args: argparse.Namespace) -> None:
    from . import load
    from .device import parse_dtype, parse_weight_dtype
    from .images import open_image
    from .pipeline import GenerationRequest

    fields: dict = {}
    if args.from_image:
        from .infotext import read_infotext

        text = read_infotext(open_image(args.from_image, "PNG"))
        if not text:
            raise SdlabError(f"{args.from_image}: has no generation parameters (no 'parameters' text)")
        fields.update(request_fields_from_infotext(text))
    if args.preset:
        fields.update(PRESETS[args.preset])
    names = ("prompt", "negative_prompt", "steps", "sampler", "schedule", "cfg_scale", "seed", "subseed",
             "subseed_strength", "width", "height", "batch_size", "n_iter", "clip_skip", "guidance_rescale", "rng",
             "denoising_strength", "mask_blur", "inpaint_full_res", "inpaint_full_res_padding",
             "inpainting_mask_invert", "refiner_switch_at", "original_size", "target_size", "crop_top_left",
             "aesthetic_score", "zero_terminal_snr")
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if not fields.get("prompt") and not args.from_image:
        raise SdlabError("give a prompt, e.g. sdlab generate \"a red circle on a blue background\"")
    if args.mode in ("img2img", "inpaint"):
        fields["init_image"] = open_image(args.init, "init image")
    if args.mode == "inpaint":
        fields["mask"] = open_image(args.mask, "mask")
        fields.setdefault("denoising_strength", 1.0)

    dtype, weight_dtype = parse_dtype(args.dtype), parse_weight_dtype(args.weight_dtype)
    pipe = load(_resolve_model(args, args.model), device=args.device, dtype=dtype, prediction=args.prediction,
                models_dir=args.models_dir, compile=args.compile, offload=args.offload, weight_dtype=weight_dtype)
    if args.vae:
        from .models_dir import load_vae_into

        models = pipe.models
        vae_path = Path(args.vae) if Path(args.vae).expanduser().is_file() else models.resolve_vae(args.vae)
        load_vae_into(pipe.bundle, vae_path)
        pipe.vae_info = {"VAE hash": models.short_hash(vae_path), "VAE": vae_path.stem}
    if args.refiner:
        from .models.storage import storage_dtype
        from .perf import load_for_inference

        refiner = load_for_inference(_resolve_model(args, args.refiner), pipe.bundle.device, pipe.bundle.dtype,
                                     compile=args.compile, offload=args.offload,
                                     weight_dtype=storage_dtype(pipe.bundle.unet))
        pipe.set_refiner(refiner)
        fields["refiner_checkpoint"] = refiner.name
    request = GenerationRequest(**fields)
    result = _run_with_progress(pipe, request)
    for path in save_images(result, Path(args.output)):
        print(path)
    if result.interrupted:
        raise SdlabError("interrupted; the images so far were saved")


def _resolve_model(args: argparse.Namespace, name: str | None) -> str | None:
    if name is None or Path(name).expanduser().exists():
        return name
    try:
        from .models_dir import ModelsDir
    except ModuleNotFoundError:
        return args.model
    models = ModelsDir(args.models_dir) if args.models_dir else ModelsDir()
    try:
        return str(models.resolve_checkpoint(name))
    except SdlabError:
        return name  # a hub repo id, or a clear "no such file" from the loader


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
    is one image, else into the folder as NNNNN-SEED.png, numbered after what is there."""
    from .checkpoints.io import atomic_write
    from .infotext import png_info

    paths = []
    if output.suffix.lower() == ".png" and len(result.images) == 1:
        targets = [output]
    else:
        folder = output.with_suffix("") if output.suffix.lower() == ".png" else output
        folder.mkdir(parents=True, exist_ok=True)
        start = 1 + max((int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")), default=-1)
        targets = [folder / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(result.seeds)]
    for image, text, target in zip(result.images, result.infotexts, targets):
        atomic_write(target, lambda tmp, image=image, text=text: image.save(tmp, format="PNG", pnginfo=png_info(text)))
        paths.append(target)
    return paths
