"""Seconds per MMDiT step, SD3-medium shape: sdlab against diffusers' SD3Transformer2DModel,
measured in one process.

    HF_HUB_OFFLINE=1 python benchmarks/mmdit_step.py [--size 1024] [--rounds 3] [--dtype bf16]
        [--preset sd3-medium] [--depth N]

Builds an MMDiT of the preset's shape (`models.mmdit.PRESETS`: SD3-medium is 24 joint blocks,
hidden 1536, 2.03 B parameters) with random weights, made directly in the dtype it runs in (no
fp32 copy of 2 B parameters ever exists), and converts them with diffusers' own single-file
converter (`convert_sd3_transformer_checkpoint_to_diffusers`) into an `SD3Transformer2DModel`
built on the meta device, so both run the same weights (the diffusers model gets its own copy)
on the same inputs: latents of a --size image (128x128 for 1024x1024), batch 2 (a prompt and
its negative, as classifier-free guidance runs them), 154 text tokens (CLIP's 77 and T5's 77,
the reference's and sdlab's default), pooled text, timestep 500.

Each network runs as its library runs it: sdlab's as the pipeline prepares it
(`storage.set_dtypes` to the compute dtype, and on CPUs where it pays, `device.packs_cpu_weights`,
its linear weights pre-packed for oneDNN as `perf.prepare_for_inference` packs them), diffusers' as
loaded. `--no-pack` leaves ours plain. Timed in interleaved rounds
(ours, theirs, ours, ...) after one warm-up call each, so that load from other processes hits both
alike; medians are shown. Memory: the weights each holds, and the working memory of one step (the
rise of the process's RSS high-water mark during the call, `_common.reset_peak_rss`).

`--depth` keeps the released models' rule (hidden 64 x depth, depth heads) at another depth, and a
small --size with it checks the plumbing in seconds: `--depth 2 --size 256`. FLOPs per step are
counted by torch's FlopCounterMode on the meta device; the share of peak is `unet_step.peak_flops`'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_bytes, memory, print_table, reset_peak_rss  # noqa: E402
from unet_step import OFFLINE_ENV, interleaved, peak_flops  # noqa: E402

TARGET = 0.95
PREFIX = "model.diffusion_model."
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def mmdit_config(preset: str, depth: int | None):
    """The preset, or the same shape at another depth by the released models' rule."""
    from sdlab.models.mmdit import PRESETS

    cfg = PRESETS[preset]
    if depth is None or depth == cfg.depth:
        return cfg
    return replace(cfg, depth=depth, hidden_size=64 * depth, heads=depth,
                   x_block_self_attn_layers=tuple(i for i in cfg.x_block_self_attn_layers if i < depth))


def random_mmdit(cfg, dtype: torch.dtype, seed: int = 0):
    """sdlab's MMDiT with every tensor random (adaLN and pos_embed too, which start at zero), made
    in `dtype` one tensor at a time: matrices N(0, 1/fan_in), vectors and positions N(0, 0.2^2),
    qk-norm gains near 1, so activations stay near unit scale through the blocks."""
    from sdlab.checkpoints.building import skip_init_on_meta
    from sdlab.models.mmdit import MMDiT

    with torch.device("meta"), skip_init_on_meta():
        net = MMDiT(cfg)
    net = net.to(dtype).to_empty(device="cpu").eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                noise = 1 + 0.2 * noise
            elif t.ndim <= 1 or name == "pos_embed":
                noise = 0.2 * noise
            else:
                noise = noise / t[0].numel() ** 0.5
            t.copy_(noise)
            del noise
    return net


def diffusers_twin(ours, cfg):
    """diffusers' SD3Transformer2DModel with our weights, through diffusers' own single-file
    converter, built on the meta device and given its own copy of each tensor."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    with init_empty_weights():
        theirs = SD3Transformer2DModel(
            sample_size=cfg.pos_embed_max_size * cfg.patch_size, patch_size=cfg.patch_size,
            in_channels=cfg.in_channels, num_layers=cfg.depth, attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.heads, joint_attention_dim=cfg.context_dim, caption_projection_dim=cfg.hidden_size,
            pooled_projection_dim=cfg.adm_in_channels, out_channels=cfg.out_channels,
            pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=cfg.x_block_self_attn_layers,
            qk_norm="rms_norm" if cfg.qk_norm else None)
    converted = convert_sd3_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in ours.state_dict().items()})
    converted = {k: v.clone() for k, v in converted.items()}  # its own weights, not views of ours
    theirs.load_state_dict(converted, strict=True, assign=True)
    return theirs.eval().requires_grad_(False)


def mmdit_flops(cfg, batch: int, latent: int, tokens: int) -> int:
    """FLOPs of one MMDiT forward, counted by torch on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdlab.models.mmdit import MMDiT

    with torch.device("meta"):
        net = MMDiT(cfg)
        x = torch.empty(batch, cfg.in_channels, latent, latent)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(x, torch.full((batch,), 500.0), torch.empty(batch, tokens, cfg.context_dim),
                torch.empty(batch, cfg.adm_in_channels))
    return counter.get_total_flops()


def weight_bytes(net: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))


def step_memory(fn) -> int:
    """The rise of the RSS high-water mark over the current RSS during one call."""
    before = memory()["rss"]
    if not reset_peak_rss():
        return 0
    fn()
    return max(memory()["peak"] - before, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (latents are 1/8; default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--batch", type=int, default=2, help="batch (default 2: a prompt and its negative)")
    parser.add_argument("--tokens", type=int, default=154, help="text tokens (default 154: CLIP 77 + T5 77)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="both networks' dtype (default bf16)")
    parser.add_argument("--preset", default="sd3-medium", help="models.mmdit.PRESETS entry (default sd3-medium)")
    parser.add_argument("--depth", type=int, help="joint blocks (hidden 64 x depth, depth heads); default the preset's")
    parser.add_argument("--no-pack", action="store_true", help="keep our weights plain (no oneDNN packing)")
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)

    from sdlab import device as devices
    from sdlab.models.layers import pack_weights_for_cpu
    from sdlab.models.storage import set_dtypes

    devices.configure_threads()
    dtype = DTYPES[args.dtype]
    cfg = mmdit_config(args.preset, args.depth)
    latent = args.size // 8
    ours = set_dtypes(random_mmdit(cfg, dtype), dtype)  # as perf.prepare_for_inference prepares it
    packed = not args.no_pack and devices.packs_cpu_weights(torch.device("cpu"), dtype)
    theirs = diffusers_twin(ours, cfg)  # from the plain weights
    if packed:
        pack_weights_for_cpu(ours)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg.in_channels, latent, latent, generator=g).to(dtype)
    context = torch.randn(args.batch, args.tokens, cfg.context_dim, generator=g).to(dtype)
    y = torch.randn(args.batch, cfg.adm_in_channels, generator=g).to(dtype)
    t = torch.full((args.batch,), 500.0)

    def run_ours():
        return ours(x, t, context, y)

    def run_theirs():
        return theirs(hidden_states=x, timestep=t.to(dtype), encoder_hidden_states=context, pooled_projections=y,
                      return_dict=False)[0]

    with torch.no_grad():
        a, b = run_ours().float(), run_theirs().float()
        diff, scale = (a - b).abs().max().item(), b.abs().max().item()
        del a, b
        work = {"ours": step_memory(run_ours), "diffusers": step_memory(run_theirs)}
        times = interleaved({"ours": run_ours, "diffusers": run_theirs}, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}

    flops = mmdit_flops(cfg, args.batch, latent, args.tokens)
    peak, peak_note = peak_flops(dtype)
    params = sum(p.numel() for p in ours.parameters())
    rows = [(name, f"{med[name]:.2f}", f"{flops / med[name] / 1e9:.0f}", f"{100 * flops / med[name] / peak:.1f}%",
             fmt_bytes(weight_bytes(net)), fmt_bytes(work[name]))
            for name, net in (("ours", ours), ("diffusers", theirs))]
    title = (f"MMDiT step, {args.preset} shape (depth {cfg.depth}, hidden {cfg.hidden_size}, {params / 1e6:.0f} M "
             f"parameters), {args.dtype}, {latent}x{latent} latents ({args.size}x{args.size}), batch {args.batch}, "
             f"{args.tokens} text tokens, {flops / 1e12:.3g} TFLOP/step; median of {args.rounds} interleaved rounds, "
             f"{torch.get_num_threads()} threads; our weights {'packed for oneDNN' if packed else 'plain'}")
    print_table(["library", "s/step", "GFLOP/s", "% peak", "weights", "step memory"], rows, title)
    print(f"time ratio ours / diffusers: {med['ours'] / med['diffusers']:.2f}x (target <= {TARGET}x); "
          f"peak: {peak_note}")
    print(f"max |ours - diffusers| on the same input: {diff:.3g} (outputs up to {scale:.3g}; {args.dtype} rounding "
          f"through {cfg.depth} blocks)")


if __name__ == "__main__":
    main()
