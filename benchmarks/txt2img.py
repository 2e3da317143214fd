"""End-to-end txt2img, SD 1.5 shape: sdlab's pipeline against diffusers' StableDiffusionPipeline.

    HF_HUB_OFFLINE=1 python benchmarks/txt2img.py [--rounds N] [--steps 20] [--size 512] [--smoke]

Writes SD 1.5-shaped random weights (the same ones) twice into a temporary folder: as a
diffusers folder, which diffusers loads, and as a native single file (fp32, like the released
v1-5 checkpoint), which sdlab loads. Then, each in a fresh child process so that peak memory
belongs to one library alone, generates one image: 512x512, 20 steps, Euler, CFG 7, the same
prompt, negative prompt and seed.

  sdlab      its defaults on this machine (`perf.load_for_inference`, as `sdlab generate`
             loads): UNet and text encoder in `device.default_dtype` (bf16 where the CPU has
             AVX512-BF16 / AMX, else fp32 with their matrices stored as fp16,
             `device.default_weight_dtype`), fp32 VAE; then `Pipeline.generate`. --dtype /
             --weight-dtype choose others (e.g. --weight-dtype fp32 for plain fp32)
  diffusers  `StableDiffusionPipeline.from_pretrained(folder)` as loaded (fp32), its Euler
             scheduler, `pipe(...)`

Times: load (weights to ready networks) and generate (text encoding, sampling, VAE decode,
to PIL), in the child. Peak RSS: the child's lifetime high-water mark (VmHWM), interpreter and
imports included; "peak while generating" restarts the mark after loading. Children alternate
across rounds; medians are shown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Stopwatch, emit, fmt_bytes, fmt_ratio, memory, print_table, reset_peak_rss,  # noqa: E402
                     run_child, warm_page_cache)
from unet_step import OFFLINE_ENV, write_models  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"
SEED = 1234
TARGET_TIME = 0.5
TARGET_RSS = 0.7


def child_sdlab(args: argparse.Namespace) -> None:
    from sdlab import device as devices
    from sdlab import perf
    from sdlab.models.storage import storage_dtype
    from sdlab.pipeline import GenerationRequest, Pipeline

    devices.configure_threads()
    watch = Stopwatch()
    bundle = perf.load_for_inference(args.single, "cpu", devices.parse_dtype(args.dtype),
                                     weight_dtype=devices.parse_weight_dtype(args.weight_dtype))
    load_s = watch.lap()
    after_load = memory()
    reset_peak_rss()
    req = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size,
                            steps=args.steps, sampler="Euler", cfg_scale=7.0, seed=SEED)
    image = Pipeline(bundle).generate(req).images[0]
    gen_s = watch.lap()
    peak_gen = memory()["peak"]
    emit({"load_s": load_s, "gen_s": gen_s, "peak": max(after_load["peak"], peak_gen), "peak_gen": peak_gen,
          "dtype": devices.dtype_name(bundle.dtype), "weights": devices.dtype_name(storage_dtype(bundle.unet)),
          "size": list(image.size)})


def child_diffusers(args: argparse.Namespace) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    watch = Stopwatch()
    pipe = StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    load_s = watch.lap()
    after_load = memory()
    reset_peak_rss()
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.0,
                 height=args.size, width=args.size, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    gen_s = watch.lap()
    peak_gen = memory()["peak"]
    emit({"load_s": load_s, "gen_s": gen_s, "peak": max(after_load["peak"], peak_gen), "peak_gen": peak_gen,
          "dtype": str(pipe.unet.dtype).replace("torch.", ""), "size": list(image.size)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (sdlab, diffusers) children (default 1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="tiny model: check the plumbing in seconds")
    parser.add_argument("--dtype", help="sdlab's compute dtype (default: its default on this machine)")
    parser.add_argument("--weight-dtype", help="sdlab's weight storage dtype (default: its default)")
    parser.add_argument("--child", choices=["sdlab", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)
    if args.child:
        (child_sdlab if args.child == "sdlab" else child_diffusers)(args)
        return

    results: dict[str, list[dict]] = {"sdlab": [], "diffusers": []}
    with tempfile.TemporaryDirectory(prefix="sdlab-bench-txt2img-") as tmp:
        folder, single = write_models(Path(tmp), args.smoke)
        for path in [single, *sorted(folder.rglob("*.safetensors"))]:
            warm_page_cache(path)
        common = ["--steps", str(args.steps), "--size", str(args.size), "--single", str(single), "--folder", str(folder)]
        common += [f"--{name.replace('_', '-')}={value}" for name in ("dtype", "weight_dtype")
                   if (value := getattr(args, name)) is not None]
        for r in range(args.rounds):
            for name in results:
                res = run_child([__file__, "--child", name, *common], env=OFFLINE_ENV, timeout=7200)
                results[name].append(res)
                print(f"  round {r + 1}/{args.rounds} {name}: load {res['load_s']:.1f}s, generate {res['gen_s']:.1f}s, "
                      f"peak {fmt_bytes(res['peak'])}", file=sys.stderr, flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    rows = []
    for label, key, fmt in (("load", "load_s", lambda v: f"{v:.1f} s"), ("generate", "gen_s", lambda v: f"{v:.1f} s"),
                            ("wall (load + generate)", None, lambda v: f"{v:.1f} s"),
                            ("peak RSS (whole process)", "peak", fmt_bytes),
                            ("peak RSS while generating", "peak_gen", fmt_bytes)):
        if key is None:
            ours, theirs = med("sdlab", "load_s") + med("sdlab", "gen_s"), med("diffusers", "load_s") + med("diffusers", "gen_s")
        else:
            ours, theirs = med("sdlab", key), med("diffusers", key)
        rows.append((label, fmt(ours), fmt(theirs), fmt_ratio(ours, theirs)))
    ours = results["sdlab"][0]
    stored = f", weights {ours['weights']}" if ours["weights"] != ours["dtype"] else ""
    title = (f"txt2img {args.size}x{args.size}, {args.steps} steps Euler, CFG 7, batch 1; sdlab "
             f"{ours['dtype']}{stored} (VAE fp32) vs diffusers {results['diffusers'][0]['dtype']}; "
             f"median of {args.rounds} round(s), each in a fresh process")
    print_table(["", "sdlab", "diffusers", "ratio"], rows, title)
    print(f"targets: wall <= {TARGET_TIME}x, peak RSS <= {TARGET_RSS}x")


if __name__ == "__main__":
    main()
