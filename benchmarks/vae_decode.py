"""Large-image VAE decode: sdlab's `decode_tiled` against diffusers' `enable_tiling()`.

    HF_HUB_OFFLINE=1 python benchmarks/vae_decode.py [--sizes 1024 2048] [--rounds N] [--smoke]

The SD VAE (the `sd` preset, fp32, as both libraries run it on a CPU) with the same random
weights in both, decoding the same random latents of 1024x1024 and 2048x2048 images, each
decode in a fresh child process so that its peak memory is its own:

  sdlab tiled      `AutoencoderKL.decode_tiled(z)` (defaults), channels-last as
                   `perf.prepare_for_inference` leaves the VAE
  diffusers tiled  `AutoencoderKL.enable_tiling()`, then `decode(z)`
  sdlab untiled    `decode(z)` at 1024 only: the reference for the accuracy column (an untiled
                   2048x2048 decode needs ~15 GB)

Accuracy: max and mean |tiled - untiled| on the 0..1 pixel scale (outputs clamped to [-1, 1]
then mapped), at 1024x1024. Peak RSS: the child's high-water mark (interpreter, torch and
weights included); "decode only" restarts the mark just before the decode. FLOP/s: the FLOPs of
the untiled decode (torch's FlopCounterMode on the meta device) over the measured time, against
the machine's fp32 peak (see unet_step.py for the assumption).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stopwatch, emit, fmt_bytes, memory, print_table, reset_peak_rss, run_child  # noqa: E402
from unet_step import OFFLINE_ENV, peak_flops  # noqa: E402

TARGET_RSS_2048 = 6e9
SEAM_BOUND = 0.02


def vae_config(smoke: bool):
    from sdlab.models import vae

    return vae.VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1) if smoke else vae.PRESETS["sd"]


def write_weights(folder: Path, smoke: bool) -> None:
    """Random SD-VAE weights (the VAE of `unet_step.random_bundle`'s recipe) as a native file and
    as a diffusers `vae` folder."""
    import torch
    from diffusers import AutoencoderKL as DiffusersVAE

    from sdlab.checkpoints import diffusers_keys as dk
    from sdlab.checkpoints.io import save_safetensors
    from sdlab.models.vae import AutoencoderKL

    cfg = vae_config(smoke)
    torch.manual_seed(0)
    ours = AutoencoderKL(cfg).eval()
    save_safetensors(ours.state_dict(), folder / "vae.safetensors")
    n = len(cfg.channel_mult)
    theirs = DiffusersVAE(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                          up_block_types=["UpDecoderBlock2D"] * n,
                          block_out_channels=[cfg.base_channels * m for m in cfg.channel_mult],
                          layers_per_block=cfg.num_res_blocks, latent_channels=cfg.latent_channels,
                          norm_num_groups=cfg.norm_groups, sample_size=512)
    theirs.load_state_dict(dk.vae_to_diffusers(ours.state_dict(), cfg), strict=True)
    theirs.save_pretrained(folder / "diffusers-vae")


def latents(size: int, factor: int):
    import torch

    return torch.randn(1, 4, size // factor, size // factor, generator=torch.Generator().manual_seed(size))


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from sdlab import device as devices

    devices.configure_threads()
    folder = Path(args.folder)
    watch = Stopwatch()
    if args.child.startswith("sdlab"):
        from sdlab.checkpoints.io import read_state_dict
        from sdlab.models.vae import AutoencoderKL

        cfg = vae_config(args.smoke)
        with torch.device("meta"):
            vae = AutoencoderKL(cfg)
        vae.load_state_dict(dict(read_state_dict(folder / "vae.safetensors")), assign=True)
        vae.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        decode = vae.decode_tiled if args.child == "sdlab-tiled" else vae.decode
        factor = cfg.downsample_factor
    else:
        from diffusers import AutoencoderKL as DiffusersVAE

        vae = DiffusersVAE.from_pretrained(folder / "diffusers-vae", local_files_only=True).eval().requires_grad_(False)
        vae.enable_tiling()
        factor = 2 ** (len(vae.config.block_out_channels) - 1)

        def decode(z):
            return vae.decode(z).sample

    z = latents(args.size, factor)
    load_s = watch.lap()
    before = memory()
    reset_peak_rss()
    with torch.no_grad():
        image = decode(z)
    decode_s = watch.lap()
    peak_decode = memory()["peak"]
    if args.save:
        np.save(args.save, ((image.float().clamp(-1, 1) + 1) / 2).numpy())
    emit({"load_s": load_s, "decode_s": decode_s, "peak": max(before["peak"], peak_decode), "peak_decode": peak_decode})


def decode_flops(cfg, size: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdlab.models.vae import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
        z = torch.empty(1, cfg.latent_channels, size // cfg.downsample_factor, size // cfg.downsample_factor)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.decode(z)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny VAE: check the plumbing in seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)
    if args.child:
        child(args)
        return

    import numpy as np
    import torch

    cfg = vae_config(args.smoke)
    peak, assumption = peak_flops(torch.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdlab-bench-vae-") as tmp:
        folder = Path(tmp)
        write_weights(folder, args.smoke)
        for size in args.sizes:
            names = ["sdlab-tiled", "diffusers-tiled"] + (["sdlab-untiled"] if size <= 1024 else [])
            results: dict[str, list[dict]] = {n: [] for n in names}
            for r in range(args.rounds):
                for name in names:
                    save = folder / f"{name}-{size}.npy"
                    res = run_child([__file__, "--child", name, "--folder", str(folder), "--size", str(size),
                                     "--save", str(save)] + (["--smoke"] if args.smoke else []),
                                    env=OFFLINE_ENV, timeout=7200)
                    results[name].append(res)
                    print(f"  {size} round {r + 1}/{args.rounds} {name}: decode {res['decode_s']:.1f}s, "
                          f"peak {fmt_bytes(res['peak'])}", file=sys.stderr, flush=True)
            error = {}
            if "sdlab-untiled" in names:
                ref = np.load(folder / f"sdlab-untiled-{size}.npy")
                for name in names[:2]:
                    d = np.abs(np.load(folder / f"{name}-{size}.npy") - ref)
                    error[name] = f"{d.max():.4f} / {d.mean():.5f}"
            flops = decode_flops(cfg, size)
            base = statistics.median(r["decode_s"] for r in results["diffusers-tiled"])
            for name in names:
                t = statistics.median(r["decode_s"] for r in results[name])
                rows.append((f"{size}x{size} {name}", f"{t:.1f} s", f"{t / base:.2f}x",
                             fmt_bytes(statistics.median(r["peak"] for r in results[name])),
                             fmt_bytes(statistics.median(r["peak_decode"] for r in results[name])),
                             error.get(name, "(reference)" if name == "sdlab-untiled" else "n/a"),
                             f"{100 * flops / t / peak:.1f}%"))
    print_table(["decode", "time", "vs diffusers tiled", "peak RSS", "peak RSS decode only",
                 "max / mean |diff| vs untiled (0..1)", "% fp32 peak"], rows,
                f"SD VAE decode, fp32, batch 1; median of {args.rounds} round(s), each decode in a fresh process")
    print(f"peak fp32: {assumption}; targets: 2048x2048 peak RSS < {TARGET_RSS_2048 / 1e9:.0f} GB, "
          f"seam max diff < {SEAM_BOUND}")


if __name__ == "__main__":
    main()
