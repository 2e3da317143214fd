"""What the training recipes in recipes/ cost: seconds per optimizer step and peak memory of each,
at the recipe's full size (the released model's shapes, random weights) on this machine.

    python benchmarks/recipe_cost.py [--recipes NAME ...] [--warmup 1] [--steps 3] [--images 8]
                                     [--set KEY=VALUE ...] [--dir DIR] [--smoke]

For each family the recipes use, the parent writes one single-file checkpoint with random fp16
weights in the released layout (SD 1.5: UNet 860 M, ~2 GB; SDXL base: UNet 2.57 B, ~6.9 GB;
`load.write_checkpoint_streamed`, one tensor at a time), and for each recipe a synthetic data set
in the layout its header's `sdlab make-dataset` line writes (parquet, or a kohya `10_name` folder),
`--images` images at the recipe's resolution. Then, in a fresh child process per recipe, the
recipe is loaded as `sdlab train` loads it, with only the model, data and output paths replaced,
validation off, and the `--set` overrides (on a machine without CUDA `mixed_precision = "no"`,
as the recipes' headers say for CPUs, unless `--set` says otherwise); the child builds the
Trainer, runs `--warmup` optimizer steps (the first fills the latent cache where the recipe
caches latents) and times `--steps` more.

Reported per recipe: the median seconds per optimizer step and per image (a step takes
batch_size x grad_accum images), the child's lifetime peak RSS (model, optimizer state,
activations), the high-water mark of the timed steps alone, and on a GPU CUDA's peak allocation.
`--smoke` runs tiny models of the same layout at 64 px to check the plumbing (seconds, not hours).
`--dir` keeps the checkpoints there for later runs (otherwise a temporary folder, removed).
Run by hand, not by pytest. The full run on a 2-core CPU takes an hour or more and needs ~40 GiB
of RAM for the SDXL LoRA at 1024 px in fp32 (an estimate; 16 GiB in bf16, as the recipe is
written: `--recipes character_lora_sdxl --set mixed_precision=bf16` on a CPU with bf16 in hardware).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stopwatch, emit, fmt_bytes, memory, print_table, reset_peak_rss, run_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# recipe -> the family of its base model (load.model_config's names)
RECIPES = {"pokemon_finetune_sd15": "sd15", "character_lora_sdxl": "sdxl", "lycoris_loha_sd15": "sd15",
           "textual_inversion_sd15": "sd15"}
SMOKE_SIZE = 64


def make_dataset_line(recipe: Path) -> list[str]:
    """The `sdlab make-dataset ...` line of a recipe's header, as argv (without `sdlab`)."""
    for line in recipe.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text.startswith("sdlab make-dataset"):
            return shlex.split(text)[1:]
    raise SystemExit(f"{recipe}: no `sdlab make-dataset` line in its header")


def write_data(recipe: Path, root: Path, images: int, size: int) -> Path:
    """The recipe's data set layout under `root`, `images` images of `size` px; returns the folder
    that takes the place of the recipe's data.folder."""
    from sdlab.training.config import load_config
    from sdlab.training.shapes import make_shapes_dataset

    argv = make_dataset_line(recipe)
    target, layout = Path(argv[2]), argv[argv.index("--layout") + 1] if "--layout" in argv else "kohya"
    folder = load_config(recipe).data.folder
    out = root / target.relative_to(folder.parent)  # keeps a repeats folder such as 10_sks_character
    make_shapes_dataset(out, images, size=size, seed=0, layout=layout)
    return root / folder.name


# ---------------------------------------------------------------- in the child


def child(args) -> None:
    watch = Stopwatch()
    import torch

    from sdlab.training.config import load_config
    from sdlab.training.trainer import Trainer

    cfg = load_config(ROOT / "recipes" / f"{args.child}.toml", args.sets)
    trainer = Trainer(cfg, progress_bar=False)
    setup_s = watch.lap()
    device = trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = trainer._global_batches()
    for _ in range(args.warmup):
        trainer.train_step(batches)
    sync()
    before = memory()["peak"]
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        w = Stopwatch()
        losses.append(trainer.train_step(batches))
        sync()
        times.append(w.lap())
    train_peak = memory()["peak"]
    emit({"times": times, "losses": losses, "setup_s": setup_s, "train_peak": train_peak,
          "peak": max(before, train_peak), "images_per_step": cfg.batch_size * cfg.grad_accum * trainer.world,
          "resolution": cfg.data.resolution, "mode": cfg.mode, "mixed_precision": cfg.mixed_precision,
          "device": str(device), "gpu_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None})
    trainer.close()


# ---------------------------------------------------------------- in the parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--images", type=int, default=8, help="images in each synthetic data set")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key for every recipe, as `sdlab train --set`")
    p.add_argument("--dir", type=Path, help="keep the random checkpoints here (reused when present)")
    p.add_argument("--smoke", action="store_true", help="tiny models at 64 px: check the plumbing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    import torch

    from load import model_config, write_checkpoint_streamed

    sets = list(args.sets)
    if not torch.cuda.is_available() and not any(s.startswith("mixed_precision=") for s in sets):
        sets.append("mixed_precision=no")  # as the recipes' headers say for a CPU
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = args.dir or tmp
        models.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in args.recipes:
            family = RECIPES[name]
            model = models / f"{family}-random{'-smoke' if args.smoke else ''}.safetensors"
            if not model.exists():
                print(f"writing {model} ...", flush=True)
                write_checkpoint_streamed(model, model_config(args.smoke, family))
            recipe = ROOT / "recipes" / f"{name}.toml"
            from sdlab.training.config import load_config

            resolution = load_config(recipe).data.resolution
            size = SMOKE_SIZE if args.smoke else (resolution if isinstance(resolution, int) else max(resolution))
            data = write_data(recipe, tmp / name, args.images, size)
            overrides = [f"base_model={str(model)!r}", f"data.folder={str(data)!r}",
                         f"output_dir={str(tmp / name / 'out')!r}", "validation.prompts=[]"]
            if args.smoke:
                overrides += [f"data.resolution={SMOKE_SIZE}", f"data.min_bucket_reso={SMOKE_SIZE}",
                              f"data.max_bucket_reso={SMOKE_SIZE}"]
            argv = [__file__, "--child", name, "--warmup", str(args.warmup), "--steps", str(args.steps)]
            argv += [a for s in [*overrides, *sets] for a in ("--set", s)]
            print(f"{name}: {args.warmup} + {args.steps} steps ...", flush=True)
            r = run_child(argv, timeout=6 * 3600)
            step = statistics.median(r["times"])
            rows.append([name, family + (" (smoke)" if args.smoke else ""), f"{size} px",
                         f"{r['mode']}, {r['mixed_precision']}", str(r["images_per_step"]), f"{step:.2f} s",
                         f"{step / r['images_per_step']:.2f} s", fmt_bytes(r["peak"]), fmt_bytes(r["train_peak"]),
                         fmt_bytes(r["gpu_peak"]) if r["gpu_peak"] is not None else "-"])
            print(f"  {r['device']}: steps {', '.join(f'{t:.2f}' for t in r['times'])} s; setup {r['setup_s']:.1f} s; "
                  f"losses {', '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
        print()
        print_table(["recipe", "model", "size", "mode, precision", "images/step", "s/step", "s/image", "peak RSS",
                     "steps' peak RSS", "GPU peak"], rows,
                    title=f"recipe cost ({args.warmup} warm-up + {args.steps} timed steps, median)")


if __name__ == "__main__":
    main()
