"""Seconds per UNet step, SD 1.5 shape: sdlab against diffusers, measured in one process.

    HF_HUB_OFFLINE=1 python benchmarks/unet_step.py [--rounds N] [--smoke]

Builds SD 1.5-shaped networks with random weights (`new_bundle` on the sd15 / sd / clip-l
presets), writes them as a diffusers folder and loads diffusers' `UNet2DConditionModel`
from it, so both run the same weights on the same inputs: 64x64 latents (512x512 images),
batch 2 (a prompt and its negative, as classifier-free guidance runs them), 77 text tokens.

Rows, each timed in interleaved rounds (ours, theirs, ours, ...) after one warm-up call, so
that the load other processes put on the machine hits both alike; medians are shown:

  fp32          both networks in fp32
  bf16          both networks in bf16
  default CPU   sdlab's default CPU path (`sdlab.device.default_dtype`: bf16 where the CPU
                has AVX512-BF16 / AMX; else fp32 with the weights stored as fp16,
                `device.default_weight_dtype`) against diffusers' default (fp32)

sdlab runs as its pipeline prepares it (`perf.prepare_for_inference`: channels-last, the
convolution weights pre-packed for oneDNN on AVX-512 CPUs); diffusers runs as loaded. FLOPs per
step come from torch's FlopCounterMode; the share of peak assumes the physical cores at the
nominal clock of /proc/cpuinfo, 64 fp32 FLOP/cycle per core (two AVX-512 FMA units: 2 x 16 lanes
x 2; 32 with AVX2 alone) and 1024 bf16 FLOP/cycle per core with AMX (Intel's figure for the
Sapphire Rapids tile unit), 128 with AVX512-BF16 alone. The bf16 rows are timed only where the
CPU has bf16 hardware (or with --bf16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
TARGET_SAME_DTYPE = 0.95
TARGET_DEFAULT = 0.5


# ---------------------------------------------------------------- shared by the benchmarks


def sd15_config(smoke: bool = False):
    """SD 1.5 as released (or, with smoke, a tiny model of the same layout to check the plumbing)."""
    from sdlab.families import FAMILIES, ModelConfig
    from sdlab.models import clip, unet, vae

    if not smoke:
        return ModelConfig(FAMILIES["sd1"], unet.PRESETS["sd15"], vae.PRESETS["sd"], (clip.PRESETS["clip-l"],))
    return ModelConfig(FAMILIES["sd1"],
                       unet.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                                       transformer_depth=(1, 1), context_dim=64),
                       vae.VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1),
                       (clip.CLIPTextConfig(layout="openai", width=64, layers=2, heads=1, mlp_width=128),))


def random_bundle(smoke: bool = False, seed: int = 0):
    """`new_bundle` with the modules' own initialisation; the layers that start at zero (each
    block's last conv, as in the original) get small random values, so that every block adds
    to the output and the outputs of the two implementations can be compared."""
    from sdlab.checkpoints.loader import new_bundle

    bundle = new_bundle(sd15_config(smoke), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for net in bundle.networks().values():
            for p in net.parameters():
                if p.ndim > 1 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return bundle


def write_models(folder: Path, smoke: bool = False) -> tuple[Path, Path]:
    """The same random weights as a diffusers folder (for diffusers) and as a native single file
    (for sdlab, which reads single files lazily); fp32, as the released SD 1.5 files are."""
    from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
    from sdlab.checkpoints.loader import save_checkpoint

    bundle = random_bundle(smoke)
    diffusers_dir, single = folder / "diffusers", folder / "sd15-random.safetensors"
    write_diffusers_folder(bundle.state_dict(), bundle.config, diffusers_dir)
    save_checkpoint(bundle, single)
    return diffusers_dir, single


def unet_flops(cfg, batch: int, latent: int, tokens: int = 77) -> int:
    """FLOPs of one UNet forward, counted by torch on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdlab.models.unet import UNet

    with torch.device("meta"):
        net = UNet(cfg)
        x = torch.empty(batch, cfg.in_channels, latent, latent)
        ctx = torch.empty(batch, tokens, cfg.context_dim)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x, torch.zeros(batch), ctx)
    return counter.get_total_flops()


def peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """The machine's peak FLOP/s for matrix maths in `dtype`, and the assumption behind it."""
    from sdlab import device as devices

    flags = devices.cpu_flags()
    cores = devices.physical_cores()
    ghz = _nominal_ghz()
    if dtype == torch.bfloat16 and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16"
    elif dtype == torch.bfloat16 and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX512-BF16"
    elif "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 FMA fp32"
    else:
        per_cycle, unit = 32, "AVX2 FMA fp32"
    return cores * ghz * 1e9 * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({unit})"


def _nominal_ghz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000
    except (OSError, ValueError):
        pass
    return 2.0


def interleaved(fns: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up call each, then `rounds` rounds in which
    every function runs once, in turn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
              file=sys.stderr, flush=True)
    return times


# ---------------------------------------------------------------- this benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--smoke", action="store_true", help="tiny model: check the plumbing in seconds")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="time the bf16 rows (default: only where the CPU has bf16 hardware; without it "
                             "PyTorch emulates bf16 and one step takes many minutes)")
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)

    from diffusers import UNet2DConditionModel

    from sdlab import device as devices
    from sdlab.models.layers import cpu_packing_pays, pack_weights_for_cpu
    from sdlab.models.storage import set_dtypes
    from sdlab.models.unet import UNet

    devices.configure_threads()
    latent = args.size // 8
    cfg = sd15_config(args.smoke)
    with tempfile.TemporaryDirectory(prefix="sdlab-bench-unet-") as tmp:
        bundle = random_bundle(args.smoke)
        from sdlab.checkpoints.diffusers_folder import write_diffusers_folder

        write_diffusers_folder(bundle.state_dict(), bundle.config, Path(tmp) / "model")
        ours32 = bundle.unet
        del bundle
        theirs32 = UNet2DConditionModel.from_pretrained(Path(tmp) / "model" / "unet").eval().requires_grad_(False)

    def prepared(net: UNet, dtype: torch.dtype, weights: torch.dtype | None = None) -> UNet:
        copy = UNet(cfg.unet).eval().requires_grad_(False)
        copy.load_state_dict(net.state_dict())
        # The same preparation the pipeline applies (weights stored narrow if asked, channels-last,
        # convolution weights packed where that is faster), without the rest of a bundle.
        set_dtypes(copy, dtype, weights).to(memory_format=torch.channels_last)
        if weights in (None, dtype) and cpu_packing_pays(dtype):
            pack_weights_for_cpu(copy)
        return copy

    default = devices.default_dtype(torch.device("cpu"))
    default_weights = devices.default_weight_dtype(torch.device("cpu"), default)
    with_bf16 = args.bf16 if args.bf16 is not None else devices.best_cpu_dtype() == torch.bfloat16
    dtypes = [torch.float32] + ([torch.bfloat16] if with_bf16 else [])
    ours = {d: prepared(ours32, d) for d in dtypes}
    narrow_default = default_weights != default and default in dtypes
    if narrow_default:
        ours["default"] = prepared(ours32, default, default_weights)
    del ours32
    theirs = {torch.float32: theirs32}
    if with_bf16:
        theirs[torch.bfloat16] = UNet2DConditionModel.from_config(theirs32.config).eval().requires_grad_(False)
        theirs[torch.bfloat16].load_state_dict(theirs32.state_dict())
        theirs[torch.bfloat16].to(torch.bfloat16)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, latent, latent, generator=g)
    ctx = torch.randn(args.batch, 77, cfg.unet.context_dim, generator=g)
    t = torch.full((args.batch,), 500.0)

    def run_ours(dtype):
        return lambda: ours[dtype](x.to(dtype), t, ctx.to(dtype))

    def run_theirs(dtype):
        return lambda: theirs[dtype](x.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample

    with torch.no_grad():
        diffs = {d: (run_ours(d)().float() - run_theirs(d)().float()).abs().max().item() for d in dtypes}
        fns = {}
        for d in dtypes:
            fns[f"ours {devices.dtype_name(d)}"] = run_ours(d)
            fns[f"diffusers {devices.dtype_name(d)}"] = run_theirs(d)
        if narrow_default:
            fns["ours default"] = lambda: ours["default"](x.to(default), t, ctx.to(default))
        times = interleaved(fns, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}

    flops = unet_flops(cfg.unet, args.batch, latent)
    rows = []
    configs = [("fp32, both", "ours fp32", "diffusers fp32", torch.float32)]
    if with_bf16:
        configs.append(("bf16, both", "ours bf16", "diffusers bf16", torch.bfloat16))
    if default in dtypes:
        stored = f", weights {devices.dtype_name(default_weights)}" if narrow_default else ""
        configs.append((f"default CPU path: ours {devices.dtype_name(default)}{stored} vs diffusers fp32",
                        "ours default" if narrow_default else f"ours {devices.dtype_name(default)}",
                        "diffusers fp32", default))
    for label, mine, ref, dtype in configs:
        peak, _ = peak_flops(dtype)
        rows.append((label, f"{med[mine]:.2f}", f"{med[ref]:.2f}", f"{med[mine] / med[ref]:.2f}x",
                     f"{flops / med[mine] / 1e9:.0f}", f"{100 * flops / med[mine] / peak:.1f}%",
                     f"{100 * flops / med[ref] / peak:.1f}%"))
    title = (f"UNet step, SD 1.5 shape, {latent}x{latent} latents ({args.size}x{args.size}), batch {args.batch}, "
             f"{flops / 1e12:.3f} TFLOP/step; median of {args.rounds} interleaved rounds, "
             f"{torch.get_num_threads()} threads")
    print_table(["config", "ours s/step", "diffusers s/step", "ratio", "ours GFLOP/s", "ours % peak",
                 "diffusers % peak"], rows, title)
    print(f"peak fp32: {peak_flops(torch.float32)[1]}; peak bf16: {peak_flops(torch.bfloat16)[1]}")
    if not with_bf16:
        print("bf16 rows left out: this CPU has no bf16 hardware (--bf16 times them anyway)")
    print("max |ours - diffusers| on the same input: "
          + ", ".join(f"{devices.dtype_name(d)} {v:.2e}" for d, v in diffs.items())
          + f"; targets: same dtype <= {TARGET_SAME_DTYPE}x, default path <= {TARGET_DEFAULT}x")


if __name__ == "__main__":
    main()
