"""Peak memory of the hires fix against plain txt2img at the hires size, SD 1.5 shape.

    HF_HUB_OFFLINE=1 python benchmarks/hires_memory.py [--size 1024] [--steps 2] [--upscaler Latent]
        [--smoke]

The web UI's promise for the hires fix is that its second pass fits where a plain txt2img of the
final size fits (issue 29). This writes SD 1.5-shaped random weights once (a native fp32 single
file, as `txt2img.py` does) and runs, each in a fresh child process so that the peak belongs to one
job: a plain txt2img at --size, and a txt2img at --size / 2 with the hires fix (scale 2, the given
upscaler, denoise 0.5, --steps second-pass steps), both with sdlab's defaults on this machine
(`perf.load_for_inference`), Euler, CFG 7. Peak RSS: the child's high-water mark (VmHWM), imports
and loaded weights included, and the rise of the mark after loading ("while generating").
The number of steps does not change the peak; a few keep the run short.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stopwatch, emit, fmt_bytes, fmt_ratio, memory, print_table, reset_peak_rss, run_child  # noqa: E402
from txt2img import NEGATIVE, PROMPT, SEED  # noqa: E402
from unet_step import OFFLINE_ENV, random_bundle  # noqa: E402


def child(args: argparse.Namespace) -> None:
    from sdlab import device as devices
    from sdlab import perf
    from sdlab.pipeline import GenerationRequest, Pipeline

    devices.configure_threads()
    watch = Stopwatch()
    bundle = perf.load_for_inference(args.model, "cpu", None)
    load_s = watch.lap()
    after_load = memory()
    reset_peak_rss()
    size = args.size if args.job == "plain" else args.size // 2
    req = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=size, height=size, steps=args.steps,
                            sampler="Euler", cfg_scale=7.0, seed=SEED)
    if args.job == "hires":
        from dataclasses import replace

        req = replace(req, enable_hr=True, hr_scale=2.0, hr_upscaler=args.upscaler, denoising_strength=0.5,
                      hr_second_pass_steps=args.steps)
    image = Pipeline(bundle).generate(req).images[0]
    peak_gen = memory()["peak"]
    emit({"load_s": load_s, "gen_s": watch.lap(), "peak": max(after_load["peak"], peak_gen),
          "rise": peak_gen - after_load["rss"], "size": list(image.size)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="final image side (default 1024)")
    parser.add_argument("--steps", type=int, default=2, help="steps of each pass (default 2)")
    parser.add_argument("--upscaler", default="Latent", help="hr_upscaler (default Latent)")
    parser.add_argument("--smoke", action="store_true", help="tiny model: check the plumbing in seconds")
    parser.add_argument("--job", choices=["plain", "hires"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        from sdlab.checkpoints.loader import save_checkpoint

        model = Path(tmp) / "sd15-random.safetensors"
        save_checkpoint(random_bundle(args.smoke), model)
        base = [__file__, "--model", str(model), "--size", str(args.size), "--steps",
                str(args.steps), "--upscaler", args.upscaler]
        results = {job: run_child(base + ["--job", job], env=OFFLINE_ENV) for job in ("plain", "hires")}
    plain, hires = results["plain"], results["hires"]
    rows = [[f"txt2img {args.size}x{args.size}", fmt_bytes(plain["peak"]), fmt_bytes(plain["rise"]),
             f"{plain['gen_s']:.1f} s", ""],
            [f"txt2img {args.size // 2} + hires x2 ({args.upscaler})", fmt_bytes(hires["peak"]),
             fmt_bytes(hires["rise"]), f"{hires['gen_s']:.1f} s", fmt_ratio(hires["peak"], plain["peak"])]]
    print_table(["job", "peak RSS", "while generating", "generate", "peak vs plain"], rows,
                title=f"hires fix memory, SD 1.5 shape, {args.steps} steps per pass")


if __name__ == "__main__":
    main()
