"""What a ControlNet adds to a sampling step, SD 1.5 shape: sdlab's controlled model against the
plain one, and diffusers' UNet + ControlNetModel against its plain UNet, in one process.

    HF_HUB_OFFLINE=1 python benchmarks/controlnet_step.py [--rounds N] [--dtype fp32|bf16] [--smoke]

Random SD 1.5-shaped UNet and ControlNet (`models.controlnet.PRESETS["sd15"]`), batch 2 (a prompt
and its negative), 64x64 latents (512x512 images), a 512x512 hint, 77 tokens. Each row is timed in
interleaved rounds after a warm-up call; medians are shown, with the ratio of the controlled step
to the plain step (the issue's target: at most the ControlNet's own forward, about 1.4x), and
sdlab's controlled step against diffusers' in the same dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table  # noqa: E402


def _time(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the plumbing in seconds")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    from sdlab.checkpoints.diffusers_keys import unet_to_diffusers
    from sdlab.controlnet.apply import ControlUnit, controlled
    from sdlab.model import UNetModel, model_sampling
    from sdlab.models.controlnet import PRESETS, ControlNet, ControlNetConfig
    from sdlab.models.unet import UNet, UNetConfig
    from sdlab.families import FAMILIES, ModelConfig
    from sdlab.models import clip, vae
    from sdlab.sampling.denoiser import CFGDenoiser, Conditioning

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cn_cfg = PRESETS["sd15"]
    if args.smoke:
        cn_cfg = ControlNetConfig(UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                                             transformer_depth=(1, 1), transformer_depth_middle=1, num_heads=8,
                                             context_dim=768))
    size = 16 if args.smoke else 64
    torch.manual_seed(0)
    unet = UNet(cn_cfg.unet).eval().to(dtype)
    net = ControlNet(cn_cfg).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    net = net.to(dtype)
    config = ModelConfig(FAMILIES["sd1"], cn_cfg.unet, vae.PRESETS["sd"], (clip.PRESETS["clip-l"],))
    sampling = model_sampling(FAMILIES["sd1"])
    model = UNetModel(unet, config, sampling, torch.device("cpu"), dtype)
    sigmas = torch.tensor([14.6, 0.0])
    unit = ControlUnit(net, torch.rand(1, 3, 8 * size, 8 * size))
    ours = controlled(model, [unit], sigmas)
    cond = Conditioning(torch.randn(1, 77, 768))
    x, sigma = torch.randn(1, 4, size, size), torch.tensor([10.0])
    plain_step = CFGDenoiser(model, cond, cond, 7.0)
    controlled_step = CFGDenoiser(ours, cond, cond, 7.0)

    # diffusers: the same weights through its converters.
    their_unet = UNet2DConditionModel.from_config(_diffusers_unet_config(cn_cfg.unet)).eval()
    their_unet.load_state_dict(unet_to_diffusers({k: v.float() for k, v in unet.state_dict().items()},
                                                 cn_cfg.unet), strict=True)
    their_unet = their_unet.to(dtype)
    their_cn = _diffusers_controlnet(net.float()).to(dtype)
    net.to(dtype)
    xx, t, ctx = torch.cat([x, x]).to(dtype), torch.full((2,), 500.0), torch.randn(2, 77, 768, dtype=dtype)
    hint = torch.rand(2, 3, 8 * size, 8 * size, dtype=dtype)

    def theirs_plain():
        their_unet(xx, t, ctx)

    def theirs_controlled():
        down, mid = their_cn(xx, t, ctx, hint, return_dict=False)
        their_unet(xx, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    rows = {"sdlab plain": lambda: plain_step(x, sigma), "sdlab + ControlNet": lambda: controlled_step(x, sigma),
            "diffusers plain": theirs_plain, "diffusers + ControlNet": theirs_controlled}
    for fn in rows.values():  # warm-up
        fn()
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            times[name] += _time(fn, 1)
    med = {name: statistics.median(v) for name, v in times.items()}
    table = [[name, f"{med[name]:.3f} s",
              f"{med[name] / med[name.split(' ')[0] + ' plain']:.2f}x",
              f"{med[name] / med['diffusers ' + name.split(' ', 1)[1]]:.2f}x"] for name in rows]
    print(f"SD 1.5-shaped step (batch 2, {8 * size}x{8 * size}, {args.dtype}), median of {args.rounds} rounds")
    print_table(["row", "time", "vs its plain step", "vs diffusers' same row"], table)


# The tests' converters of configs and weights to diffusers' (the parity tests prove them).
def _diffusers_unet_config(cfg) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.models.test_unet import diffusers_config

    return diffusers_config(cfg)


def _diffusers_controlnet(net):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.models.test_controlnet import diffusers_controlnet

    return diffusers_controlnet(net)


if __name__ == "__main__":
    main()
