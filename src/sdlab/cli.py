"""The `sdlab` command line. Thin: each sub-command parses its arguments and
calls the library; errors meant for the user print one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from .errors import MissingDependency, SdlabError, UsageError

def _human(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def cmd_info(args: argparse.Namespace) -> None:
    if args.device is not None:
        from .device import choose_device, describe

        print(describe(choose_device(args.device)))
        if args.model is None:
            return
    if args.model is None:
        raise SdlabError("give a checkpoint to inspect, or --device")
    from .checkpoints.loader import EMA_PREFIX, config_of, file_sha256, open_model
    from .families import UNET_PREFIX, VAE_PREFIX, looks_like_lora

    if _is_control_folder(Path(args.model)):
        _print_rows(_control_rows(Path(args.model), None))
        return
    sd, path = open_model(args.model)
    if path.is_file():
        from .controlnet.loading import control_kind

        if control_kind(sd.shapes) is not None:  # a ControlNet or T2I-Adapter (models/ControlNet)
            _print_rows(_control_rows(path, file_sha256(path)[:10]))
            return
    if path.is_file() and looks_like_lora(sd.keys()):
        _print_rows(_lora_rows(path))
        return
    from .checkpoints import sd3

    if sd3.is_sd3(sd):
        _print_rows(sd3.info_rows(sd, path) + ([("model hash", file_sha256(path)[:10])] if path.is_file() else []))
        return
    cfg = config_of(sd, args.prediction)
    prediction = cfg.prediction
    if args.prediction is None and cfg.family.name == "sd2" and "sdlab.prediction" not in sd.metadata:
        from .checkpoints.loader import load_bundle

        prediction = load_bundle(args.model, device="cpu").prediction
    elif "sdlab.prediction" in sd.metadata and args.prediction is None:
        prediction = sd.metadata["sdlab.prediction"]

    def count(prefix: str) -> int:
        return sum(math.prod(s) for k, s in sd.shapes.items() if k.startswith(prefix))

    dtypes = sorted({str(sd.dtypes[k]).replace("torch.", "") for k in sd.shapes if sd.dtypes[k].is_floating_point})
    has_ema = any(k.startswith(EMA_PREFIX) for k in sd.shapes)
    rows = [("file", str(path)), ("family", f"{cfg.family.name} ({cfg.family.label})"),
            ("prediction", prediction + (", zero terminal SNR" if cfg.family.zero_terminal_snr else "")),
            ("default size", f"{cfg.family.default_size}x{cfg.family.default_size}"),
            ("UNet", _human(count(UNET_PREFIX))), ("VAE", _human(count(VAE_PREFIX)))]
    for i, slot in enumerate(cfg.family.text_encoders):
        rows.append((f"text encoder {i + 1}" if len(cfg.family.text_encoders) > 1 else "text encoder",
                     f"{_human(count(slot.prefix))} ({slot.layout}, {cfg.text_encoders[i].layers} layers)"))
    rows += [("dtype", ", ".join(dtypes)), ("EMA weights", "yes" if has_ema else "no")]
    if path.is_file():
        rows.append(("model hash", file_sha256(path)[:10]))
    _print_rows(rows)


def _is_control_folder(path: Path) -> bool:
    """A diffusers ControlNetModel or T2IAdapter folder."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("_class_name") in ("ControlNetModel", "T2IAdapter")


def _control_rows(path: Path, model_hash: str | None) -> list[tuple[str, str]]:
    from .controlnet.loading import inspect_control_file

    rows = [("file", str(path)), ("kind", inspect_control_file(path).describe())]
    return rows + ([("model hash", model_hash)] if model_hash else [])


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# kohya's training metadata worth showing, in this order: (label, ss_* key).
_LORA_METADATA = (("trained on", "ss_base_model_version"), ("base model file", "ss_sd_model_name"),
                  ("network", "ss_network_module"), ("network args", "ss_network_args"),
                  ("resolution", "ss_resolution"), ("steps", "ss_steps"), ("epochs", "ss_epoch"),
                  ("images", "ss_num_train_images"), ("optimizer", "ss_optimizer"), ("learning rate", "ss_learning_rate"),
                  ("clip skip", "ss_clip_skip"), ("trained with", "modelspec.implementation"))


def _lora_rows(path: Path) -> list[tuple[str, str]]:
    """What `sdlab info` tells of a LoRA file: its modules, ranks and alphas, and its training metadata."""
    from .lora import load_lora

    lora = load_lora(path)
    by_net: dict[str, int] = {}
    for m in lora.modules:
        by_net[m.net] = by_net.get(m.net, 0) + 1
    nets = {"unet": "UNet", "te0": "text encoder", "te1": "text encoder 2"}
    kinds = sorted({m.kind for m in lora.modules})
    ranks = sorted({m.rank for m in lora.modules if m.rank})
    alphas = sorted({m.alpha for m in lora.modules if m.alpha is not None})
    rows = [("file", str(path)), ("kind", ", ".join(kinds)),
            ("modules", ", ".join(f"{label} {by_net[n]}" for n, label in nets.items() if n in by_net)),
            ("rank", ", ".join(map(str, ranks)) or "-"), ("alpha", ", ".join(f"{a:g}" for a in alphas) or "none (scale 1)")]
    if lora.unsupported:
        rows.append(("not applied", f"{len(lora.unsupported)} keys sdlab cannot apply"))
    meta = lora.metadata
    rows += [(label, meta[key]) for label, key in _LORA_METADATA if meta.get(key) not in (None, "", "None", "{}")]
    return rows


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoints import sd3
    from .checkpoints.diffusers_folder import is_diffusers_folder, write_diffusers_folder
    from .checkpoints.loader import load_bundle, save_checkpoint
    from .device import parse_dtype

    dst = Path(args.dst)
    to = args.to or ("single" if dst.suffix in (".safetensors", ".ckpt") else "diffusers")
    if to == "single" and dst.suffix not in (".safetensors", ".ckpt"):  # before the model loads
        raise SdlabError(f"{dst}: single-file output must end in .safetensors (or .ckpt, for tools that want one)")
    if to == "diffusers" and dst.exists():
        raise UsageError(f"{dst}: already exists; choose a new folder")
    dtype = parse_dtype(args.dtype or "fp32")
    encoders = {"clip_l": args.clip_l, "clip_g": args.clip_g, "t5xxl": args.t5}
    bundle = load_bundle(args.src, device="cpu", dtype=dtype, prediction=args.prediction, use_ema=not args.no_ema,
                         text_encoder_files=encoders, vae_file=args.vae)
    if any(encoders.values()) and not bundle.family.is_flow:
        raise UsageError(f"--clip-l, --clip-g and --t5 are for SD3 / SD3.5 models, not {bundle.family.label}")
    if args.vae is not None:  # (an SD3 file without a VAE was given this one by load_bundle already)
        from .models_dir import load_vae_into

        load_vae_into(bundle, args.vae)
    # SD3's T5 keeps a narrower file's dtype in memory (`sd3.t5_weight_dtype`): cast to `dtype` here.
    if to == "single":
        save_checkpoint(bundle, dst, dtype=dtype if bundle.family.is_flow else None)
    else:
        if is_diffusers_folder(Path(args.src)) and to == "diffusers":
            logging.getLogger(__name__).info("source is already a diffusers folder; writing a fresh copy")
        if bundle.family.is_flow:
            sd3.write_sd3_folder(bundle.state_dict(dtype), bundle.config, dst, bundle.tokenizers)
        else:
            write_diffusers_folder(bundle.state_dict(), bundle.config, dst)
    print(f"wrote {dst} ({bundle.family.name}, {to})")


def _lora_and_ratio(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH:RATIO` (a drive letter's colon is not a ratio)."""
    path, sep, ratio = spec.rpartition(":")
    if sep:
        try:
            return path, float(ratio)
        except ValueError:
            pass
    return spec, 1.0


def cmd_merge_lora(args: argparse.Namespace) -> None:
    import json

    import torch

    from .checkpoints.loader import load_bundle, save_checkpoint
    from .device import parse_dtype
    from .lora import apply_loras, load_lora

    dst = Path(args.dst)
    if dst.suffix != ".safetensors":
        raise SdlabError(f"{dst}: the merged checkpoint must end in .safetensors")
    dtype = parse_dtype(args.dtype or "fp32")
    specs = [_lora_and_ratio(spec) for spec in args.loras]
    loras = [(load_lora(path), ratio, ratio) for path, ratio in specs]  # every file is checked before the model loads
    bundle = load_bundle(args.model, device="cpu", dtype=torch.float32)
    apply_loras(bundle, loras)  # in fp32, whatever the output dtype; it warns of modules that match no layer
    merged = [[Path(path).name, ratio] for path, ratio in specs]
    save_checkpoint(bundle, dst, dtype=dtype, metadata={"sdlab.merged_loras": json.dumps(merged)})
    print(f"wrote {dst} ({bundle.family.name}, {len(specs)} LoRA{'s' if len(specs) > 1 else ''} merged)")


class _ShowDefaults(argparse.HelpFormatter):
    """Ends an option's help with its default where the help does not say it already. None is
    never shown: it means "as the model, the PNG or the preset says", which the help says in words
    where it matters; nor is a switch's False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool)):
            return text
        return text + " (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """The parser of one sub-command: its errors print its own usage (argparse hands unknown
    arguments up to the top-level parser, whose usage lists only the commands), and its --help
    shows the options' defaults."""

    def __init__(self, *args, formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter, **kwargs):
        if not issubclass(formatter_class, _ShowDefaults):  # keep a command's own (e.g. raw description)
            formatter_class = type(f"_ShowDefaults{formatter_class.__name__}", (_ShowDefaults, formatter_class), {})
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace, extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlab", description="Stable Diffusion in Python: generate, fine-tune and serve SD models.",
        epilog="Run 'sdlab COMMAND --help' for the options of one command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what sdlab is doing")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)

    p = sub.add_parser("info", help="what a checkpoint (or LoRA) is: family, prediction, sizes, EMA",
                       description="Show a checkpoint's family, prediction type, parameter counts, dtype and EMA; "
                                   "or a LoRA's modules, ranks, alphas and training metadata.")
    p.add_argument("model", nargs="?", help="a .safetensors/.ckpt file (a model or a LoRA), a diffusers folder, a "
                                            "hub repo id, or demo for the built-in demo model (a file or folder "
                                            "named demo here wins)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    p.add_argument("--device", nargs="?", const="auto", default=None,
                   help="show the device sdlab would use (or the named one) and the dtype it picks there")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="single file <-> diffusers folder",
                       description="Convert a checkpoint between a single .safetensors file (the layout the web UIs "
                                   "use) and a diffusers folder.")
    p.add_argument("src", help="a .safetensors/.ckpt file, a diffusers folder or demo (the built-in demo model)")
    p.add_argument("dst", help="output: a .safetensors (or .ckpt) file or a new folder")
    p.add_argument("--to", choices=["single", "diffusers"], help="output format (default: from DST's name)")
    p.add_argument("--dtype", help="weight dtype of the output: fp32 (default), fp16, bf16")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    p.add_argument("--no-ema", action="store_true", help="keep the raw weights when the file also has EMA ones")
    p.add_argument("--vae", default=None, help="a separate VAE file to write in place of the model's (SD3.5 files "
                                               "carry none: give SD3's 16-channel VAE)")
    p.add_argument("--clip-l", default=None, help="SD3: a CLIP-L file to write in place of the checkpoint's")
    p.add_argument("--clip-g", default=None, help="SD3: a CLIP-G file to write in place of the checkpoint's")
    p.add_argument("--t5", default=None, help="SD3: a T5-XXL file (fp16 or fp8) to write in place of the checkpoint's")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge-lora", help="merge LoRAs into a checkpoint",
                       description="Add LoRAs (kohya/A1111, LyCORIS or diffusers/PEFT files) into a checkpoint's "
                                   "weights and save it as one .safetensors file, as kohya's merge_lora.py does.",
                       epilog="example: sdlab merge-lora model.safetensors style.safetensors:0.8 face.safetensors:0.5 "
                              "-o merged.safetensors --dtype fp16")
    p.add_argument("model", help="a .safetensors/.ckpt file, a diffusers folder, a hub repo id or demo (the "
                                 "built-in demo model)")
    p.add_argument("loras", nargs="+", metavar="LORA[:RATIO]", help="LoRA files, each with its weight (default 1)")
    p.add_argument("-o", "--output", dest="dst", required=True, help="the merged checkpoint (.safetensors)")
    p.add_argument("--dtype", help="weight dtype of the output: fp32 (default), fp16, bf16")
    p.set_defaults(func=cmd_merge_lora)

    # Commands that live beside the code they drive; each module has `register(subparsers)`
    # and imports nothing heavy at module level.
    import importlib

    for module in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(sub)
    return parser


COMMAND_MODULES = ("sdlab.generate_cli", "sdlab.models_dir", "sdlab.training.cli", "sdlab.server.cli",
                   "sdlab.upscale_cli", "sdlab.merge_cli", "sdlab.controlnet_cli", "sdlab.xyz_cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command in ("generate", "img2img", "inpaint", "serve", "train", "grid"):
        from .device import configure_threads

        configure_threads()  # one thread per physical core unless OMP/MKL_NUM_THREADS say otherwise
    try:
        args.func(args)
    except (MissingDependency, UsageError) as e:  # cannot run as installed / as asked: a usage error, as argparse's
        print(f"sdlab: error: {e}", file=sys.stderr)
        return 2
    except SdlabError as e:
        print(f"sdlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
