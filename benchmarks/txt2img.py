"""End-to-end txt2img, SD 1.5 shape: sdlab's pipeline against diffusers' StableDiffusionPipeline.

    HF_HUB_OFFLINE=1 python benchmarks/txt2img.py [--source folder|single] [--rounds N] [--steps 20]
        [--size 512] [--dtype D --weight-dtype W] [--smoke]

Writes SD 1.5-shaped random weights (the same ones) twice into a temporary folder, in the two
forms models are downloaded in: a native single file in fp32 (like the released v1-5
checkpoint) and a diffusers folder in fp16 (like most diffusers downloads). Then, each in a
fresh child process so that peak memory belongs to one library alone, generates one image:
512x512, 20 steps, Euler, CFG 7, the same prompt, negative prompt and seed.

  sdlab      from each source (`--source` picks one; default both, a row each): its defaults on
             this machine (`perf.load_for_inference`, as `sdlab generate` loads): UNet and text
             encoder in `device.default_dtype` (bf16 where the CPU has AVX512-BF16 / AMX, else
             fp32 with their matrices stored as fp16, `device.default_weight_dtype`), fp32 VAE;
             then `Pipeline.generate`. --dtype / --weight-dtype choose others (e.g.
             --weight-dtype fp32 for plain fp32, --dtype fp32 --weight-dtype fp16 for the AVX2
             default on any CPU)
  diffusers  `StableDiffusionPipeline.from_pretrained(folder)` from the fp16 folder, as loaded
             (its default: fp32), its Euler scheduler, `pipe(...)`; the baseline of every row

Times: load (weights to ready networks) and generate (text encoding, sampling, VAE decode,
to PIL), in the child. Peak RSS: the child's lifetime high-water mark (VmHWM), interpreter and
imports included; "while loading" is the mark when the load returned (imports included), "while
generating" restarts the mark after loading. Children alternate across rounds; medians are shown,
with the ratio of each sdlab row to diffusers.
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
from unet_step import OFFLINE_ENV, random_bundle  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"
SEED = 1234
TARGET_TIME = 0.5
TARGET_RSS = 0.7
SOURCES = {"single": "single file, fp32", "folder": "diffusers folder, fp16"}


def write_models(folder: Path, smoke: bool = False) -> dict[str, Path]:
    """The same random weights as a native single file in fp32 and as a diffusers folder in fp16."""
    import torch

    from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
    from sdlab.checkpoints.loader import save_checkpoint

    bundle = random_bundle(smoke)
    paths = {"single": folder / "sd15-random.safetensors", "folder": folder / "sd15-random-fp16"}
    save_checkpoint(bundle, paths["single"])
    write_diffusers_folder(bundle.state_dict(torch.float16), bundle.config, paths["folder"])
    return paths


def child_sdlab(args: argparse.Namespace) -> None:
    from sdlab import device as devices
    from sdlab import perf
    from sdlab.models.storage import storage_dtype
    from sdlab.pipeline import GenerationRequest, Pipeline

    devices.configure_threads()
    watch = Stopwatch()
    bundle = perf.load_for_inference(args.model, "cpu", devices.parse_dtype(args.dtype),
                                     weight_dtype=devices.parse_weight_dtype(args.weight_dtype))
    load_s = watch.lap()
    after_load = memory()
    reset_peak_rss()
    req = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size,
                            steps=args.steps, sampler="Euler", cfg_scale=7.0, seed=SEED)
    image = Pipeline(bundle).generate(req).images[0]
    gen_s = watch.lap()
    peak_gen = memory()["peak"]
    emit({"load_s": load_s, "gen_s": gen_s, "peak": max(after_load["peak"], peak_gen), "peak_load": after_load["peak"],
          "peak_gen": peak_gen,
          "dtype": devices.dtype_name(bundle.dtype), "weights": devices.dtype_name(storage_dtype(bundle.unet)),
          "size": list(image.size)})


def child_diffusers(args: argparse.Namespace) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    watch = Stopwatch()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    load_s = watch.lap()
    after_load = memory()
    reset_peak_rss()
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=7.0,
                 height=args.size, width=args.size, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    gen_s = watch.lap()
    peak_gen = memory()["peak"]
    emit({"load_s": load_s, "gen_s": gen_s, "peak": max(after_load["peak"], peak_gen), "peak_load": after_load["peak"],
          "peak_gen": peak_gen,
          "dtype": str(pipe.unet.dtype).replace("torch.", ""), "size": list(image.size)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=list(SOURCES), action="append",
                        help="what sdlab loads: the fp32 single file or the fp16 diffusers folder (default: both)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (sdlab, ..., diffusers) children (default 1)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="tiny model: check the plumbing in seconds")
    parser.add_argument("--dtype", help="sdlab's compute dtype (default: its default on this machine)")
    parser.add_argument("--weight-dtype", help="sdlab's weight storage dtype (default: its default)")
    parser.add_argument("--child", choices=["sdlab", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)
    if args.child:
        (child_sdlab if args.child == "sdlab" else child_diffusers)(args)
        return

    sources = [s for s in SOURCES if s in (args.source or SOURCES)]
    runs = [("sdlab", source) for source in sources] + [("diffusers", "folder")]
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    with tempfile.TemporaryDirectory(prefix="sdlab-bench-txt2img-") as tmp:
        paths = write_models(Path(tmp), args.smoke)
        for path in [paths["single"], *sorted(paths["folder"].rglob("*.safetensors"))]:
            warm_page_cache(path)
        common = ["--steps", str(args.steps), "--size", str(args.size)]
        common += [f"--{name.replace('_', '-')}={value}" for name in ("dtype", "weight_dtype")
                   if (value := getattr(args, name)) is not None]
        for r in range(args.rounds):
            for lib, source in runs:
                res = run_child([__file__, "--child", lib, "--model", str(paths[source]), *common], env=OFFLINE_ENV,
                                timeout=7200)
                results[lib, source].append(res)
                print(f"  round {r + 1}/{args.rounds} {lib} ({SOURCES[source]}): load {res['load_s']:.1f}s, "
                      f"generate {res['gen_s']:.1f}s, peak {fmt_bytes(res['peak'])}", file=sys.stderr, flush=True)

    def med(run: tuple[str, str], key: str) -> float:
        if key == "wall":
            return statistics.median(r["load_s"] + r["gen_s"] for r in results[run])
        return statistics.median(r[key] for r in results[run])

    base = ("diffusers", "folder")
    times, peaks = [], []
    for run in runs:
        ratio = (lambda key: "" if run == base else fmt_ratio(med(run, key), med(base, key)))  # noqa: E731
        label = f"{run[0]}, {SOURCES[run[1]]}"
        times.append((label, f"{med(run, 'load_s'):.1f} s", f"{med(run, 'gen_s'):.1f} s", f"{med(run, 'wall'):.1f} s",
                      ratio("wall")))
        peaks.append((label, fmt_bytes(med(run, "peak")), ratio("peak"), fmt_bytes(med(run, "peak_load")),
                      ratio("peak_load"), fmt_bytes(med(run, "peak_gen")), ratio("peak_gen")))
    ours = results["sdlab", sources[0]][0]
    stored = f", weights {ours['weights']}" if ours["weights"] != ours["dtype"] else ""
    print(f"txt2img {args.size}x{args.size}, {args.steps} steps Euler, CFG 7, batch 1; sdlab "
          f"{ours['dtype']}{stored} (VAE fp32) vs diffusers {results[base][0]['dtype']}; "
          f"median of {args.rounds} round(s), each in a fresh process; ratios to diffusers\n")
    print_table(["weights loaded by", "load", "generate", "wall", "ratio"], times)
    print()
    print_table(["peak RSS", "whole process", "ratio", "while loading", "ratio", "while generating", "ratio"], peaks)
    print(f"targets: wall <= {TARGET_TIME}x, peak RSS <= {TARGET_RSS}x")


if __name__ == "__main__":
    main()
