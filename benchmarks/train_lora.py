"""LoRA training step time and peak memory on an SD 1.5-shaped UNet: sdlab's trainer pieces
against the diffusers `train_text_to_image_lora.py` loop.

    python benchmarks/train_lora.py [--rank 16] [--size 512] [--batch 1] [--warmup 1] [--steps 3] [--repeat 1]
                                    [--dtype fp32|bf16|mixed-bf16|mixed-fp16] [--device cpu|cuda]

The parent builds one random SD 1.5 model (`new_bundle`) and writes its UNet twice to a
temporary folder: as a diffusers folder (`write_diffusers_folder`, for
`UNet2DConditionModel.from_pretrained`) and as our native state dict. Then, each in a fresh
child process, alternating across rounds:

  sdlab      `UNet(PRESETS["sd15"])` + `sdlab.training.lora_network.LoRANetwork` (hooks) on the
             attention projections only (to_q, to_k, to_v, to_out.0), the trainer's AdamW
             (`trainer.adamw`, PyTorch's fused kernel) on the LoRA params;
             glibc told to reuse large freed blocks (`device.reuse_freed_memory`), as the
             Trainer does on the CPU (`--plain-malloc` leaves that out). What makes the
             difference is in the model and LoRA code, not here: frozen layers keep less for
             backward (models/layers.py), wide convolutions over small maps and all 1x1
             convolutions run as matrix products, 64x64 input gradients as forward convolutions with the flipped weight,
             the transformers' 1x1 projections go straight between pixels and tokens, the
             LayerNorm outputs the LoRAs read are computed again in backward rather than kept,
             the 320-channel feed-forwards recompute their projection (on a GPU all of them, under
             autocast too), under autocast the LayerNorms and GroupNorm32 run in the autocast
             dtype (CUDA's autocast would keep fp32 copies of their inputs, and each Linear after
             a LayerNorm would cast its output again), and each LoRA update is accumulated in
             place (lora_network._AddLowRank)
  diffusers  `UNet2DConditionModel` + PEFT `LoraConfig(r, lora_alpha, target_modules=[to_k, to_q,
             to_v, to_out.0])` via `unet.add_adapter`, torch.optim.AdamW on the trainable params
             (as its script)

`--dtype mixed-bf16` is the scripts' `--mixed_precision bf16`: the frozen UNet in bf16, the LoRA
in fp32 (diffusers' `cast_training_params`), forward under bf16 autocast; as the Trainer does
(`mixed-fp16` likewise, for GPUs without bf16; no loss scaling, as neither side needs it for
timing). `--device cuda` runs both on the GPU and reports the CUDA allocator's peak
(`torch.cuda.max_memory_allocated`) in place of the peak RSS.

Both: the same rank and alpha, batch (1 unless `--batch`), the same dtype, gradient checkpointing off, the same
precomputed random latents / text context / timesteps / target, so only UNet forward +
backward + optimizer step is timed (median over `--steps` after `--warmup`). The table gives
each side's best round and, below it, the median over rounds of the two sides' ratio within a
round (a shared slow spell cancels there). Peak RSS is the child's lifetime peak (weights,
activations, optimizer state); "train peak" is the high-water mark from just before the first
step. Run by hand, not by pytest; a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (emit, fmt_bytes, fmt_ratio, fmt_seconds, memory, print_table, reset_peak_rss,  # noqa: E402
                     run_child, Stopwatch)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "mixed-bf16": "bfloat16", "mixed-fp16": "float16"}


def _precision(args):
    """(dtype of the base and the inputs, whether the forward runs under autocast)."""
    import torch

    return getattr(torch, DTYPES[args.dtype]), args.dtype.startswith("mixed")


def _inputs(size: int, dtype, batch: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    n = size // 8
    made = (torch.randn(batch, 4, n, n, generator=g).to(dtype), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 77, 768, generator=g).to(dtype), torch.randn(batch, 4, n, n, generator=g).to(dtype))
    return tuple(t.to(device) for t in made)


def _peak(device) -> int:
    """The high-water mark since the last `_reset_peak`: GPU memory on CUDA, RSS on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else memory()["peak"]


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _loop(step, warmup: int, steps: int, device) -> tuple[list[float], int, int]:
    """Step times after the warm-up, the memory peak of the timed steps and that of the whole child."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    before = _peak(device)
    _reset_peak(device)
    times = []
    for _ in range(steps):
        w = Stopwatch()
        step()
        sync()
        times.append(w.lap())
    train_peak = _peak(device)
    return times, train_peak, max(before, train_peak)


def child_sdlab(args) -> None:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from sdlab import device as devices
    from sdlab.models.unet import PRESETS, UNet
    from sdlab.training.lora_network import LoRANetwork
    from sdlab.training.trainer import adamw

    device = torch.device(args.device)
    if not args.plain_malloc and device.type == "cpu":
        devices.reuse_freed_memory()  # as the Trainer does on the CPU
    dtype, mixed = _precision(args)
    with torch.device("meta"):
        unet = UNet(PRESETS["sd15"])
    unet.load_state_dict(load_file(args.folder / "unet-native.safetensors"), assign=True)
    unet.to(device, dtype).requires_grad_(False).train()
    unet.gradient_checkpointing = False
    torch.manual_seed(0)
    lora = LoRANetwork(unet, None, args.rank, args.rank, only=r"attn[12]_to_(q|k|v|out_0)$")
    lora.to(device, torch.float32 if mixed else dtype)
    lora.apply()
    params = [p for p in lora.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-4)  # the trainer's: PyTorch's fused kernel
    x, t, ctx, target = _inputs(args.size, dtype, args.batch, device)

    def step():
        with torch.autocast(device.type, dtype, enabled=mixed):
            pred = unet(x, t.float(), ctx)
        F.mse_loss(pred.float(), target.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, train_peak, peak = _loop(step, args.warmup, args.steps, device)
    emit({"times": times, "train_peak": train_peak, "peak": peak,
          "lora_params": sum(map(torch.numel, params)), "modules": len(lora.loras)})


def child_diffusers(args) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    device = torch.device(args.device)
    dtype, mixed = _precision(args)
    unet = UNet2DConditionModel.from_pretrained(args.folder / "unet", torch_dtype=dtype).to(device)
    unet.requires_grad_(False).train()
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    if mixed:  # the LoRA trains in fp32, as ours (diffusers' `cast_training_params`)
        for p in params:
            p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, t, ctx, target = _inputs(args.size, dtype, args.batch, device)

    def step():
        with torch.autocast(device.type, dtype, enabled=mixed):
            pred = unet(x, t, ctx, return_dict=False)[0]
        F.mse_loss(pred.float(), target.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, train_peak, peak = _loop(step, args.warmup, args.steps, device)
    n_modules = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    emit({"times": times, "train_peak": train_peak, "peak": peak,
          "lora_params": sum(map(torch.numel, params)), "modules": n_modules})


def write_models(folder: Path) -> None:
    from safetensors.torch import save_file

    from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
    from sdlab.checkpoints.loader import new_bundle
    from sdlab.families import FAMILIES, ModelConfig
    from sdlab.models.clip import PRESETS as CLIP_PRESETS
    from sdlab.models.unet import PRESETS
    from sdlab.models.vae import PRESETS as VAE_PRESETS

    cfg = ModelConfig(FAMILIES["sd1"], PRESETS["sd15"], VAE_PRESETS["sd"], (CLIP_PRESETS["clip-l"],))
    bundle = new_bundle(cfg, seed=0, init_std=0.02)  # no zero-initialised layers: every weight matters
    write_diffusers_folder(bundle.state_dict(), bundle.config, folder)
    save_file({k: v.contiguous() for k, v in bundle.unet.state_dict().items()}, folder / "unet-native.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; memory is the CUDA allocator's peak there")
    ap.add_argument("--plain-malloc", action="store_true",
                    help="run sdlab without devices.reuse_freed_memory (to see what it buys)")
    ap.add_argument("--child", choices=["sdlab", "diffusers"])
    ap.add_argument("--folder", type=Path)
    args = ap.parse_args()
    if args.child:
        (child_sdlab if args.child == "sdlab" else child_diffusers)(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-train-lora-") as tmp:
        folder = Path(tmp) / "sd15"
        write_models(folder)
        common = [__file__, "--folder", str(folder), "--rank", str(args.rank), "--size", str(args.size), "--batch", str(args.batch),
                  "--warmup", str(args.warmup), "--steps", str(args.steps), "--dtype", args.dtype,
                  "--device", args.device,
                  *(["--plain-malloc"] if args.plain_malloc else [])]
        results: dict[str, list[dict]] = {"sdlab": [], "diffusers": []}
        for r in range(args.repeat):
            order = ["sdlab", "diffusers"] if r % 2 == 0 else ["diffusers", "sdlab"]
            for who in order:
                res = run_child([*common, "--child", who])
                print(f"round {r + 1} {who}: steps {[round(t, 2) for t in res['times']]} s, "
                      f"peak {fmt_bytes(res['peak'])}", flush=True)
                results[who].append(res)

    def best(who: str, key: str):
        if key == "time":
            return min(statistics.median(r["times"]) for r in results[who])
        return min(r[key] for r in results[who])

    # The rounds ran back to back, so a round's two medians saw the same machine: their ratio is
    # steadier than the ratio of the best rounds, which favours the side whose times vary more.
    paired = [statistics.median(ours["times"]) / statistics.median(theirs["times"])
              for ours, theirs in zip(results["sdlab"], results["diffusers"])]
    print("step time ratio per round (sdlab / diffusers): " + " / ".join(f"{r:.2f}" for r in paired))
    rows = []
    mem = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    for label, key, fmt in (("step time (median)", "time", fmt_seconds), (f"{mem}, whole child", "peak", fmt_bytes),
                            (f"{mem}, training steps", "train_peak", fmt_bytes)):
        ours, theirs = best("sdlab", key), best("diffusers", key)
        rows.append([label, fmt(ours), fmt(theirs), fmt_ratio(ours, theirs)])
        if key == "time":
            rows.append(["step time, median of round ratios", "", "", f"{statistics.median(paired):.2f}x"])
    rows.append(["LoRA modules / params", f"{results['sdlab'][0]['modules']} / {results['sdlab'][0]['lora_params']:,}",
                 f"{results['diffusers'][0]['modules']} / {results['diffusers'][0]['lora_params']:,}", ""])
    print_table(["", "sdlab", "diffusers", "sdlab / diffusers"], rows,
                title=f"LoRA training step, SD 1.5 UNet, {args.size} px, rank {args.rank}, batch {args.batch}, {args.dtype}, "
                      f"{args.device}, best of {args.repeat} round(s), {args.steps} steps after {args.warmup} warm-up")


if __name__ == "__main__":
    main()
