"""`sdlab train` and `sdlab make-dataset`. Imports nothing heavy until a command runs."""

from __future__ import annotations

import argparse

# Flags for the options people change most (type, help); anything else goes through --set KEY=VALUE.
_FLAGS = {
    "mode": (str, "lora, finetune, scratch or embedding (textual inversion; required, here or in the config)"),
    "base_model": (str, "the model to train on: a .safetensors/.ckpt file or a diffusers folder "
                        "(SD 1.x, SD 2.x, SDXL, SD3 / SD3.5), or demo (the built-in demo model)"),
    "output_dir": (str, "where the result, states and samples go (default output)"),
    "output_name": (str, "file name of the result, without .safetensors (default model)"),
    "steps": (int, "optimizer steps (default 1000)"),
    "epochs": (int, "passes over the data instead of --steps (kohya's max_train_epochs; default: --steps)"),
    "batch_size": (int, "images per step and process (default 1)"),
    "grad_accum": (int, "batches accumulated into one optimizer step (default 1)"),
    "lr": (float, "learning rate (default 1e-4)"),
    "lr_scheduler": (str, "constant, linear, cosine, cosine_with_restarts or polynomial (default constant)"),
    "mixed_precision": (str, "no, bf16 or fp16 (default no)"),
    "seed": (int, "seeds the data order, augmentation, noise and new weights (default 0)"),
    "save_every_n_steps": (int, "also save the result and a --resume state every N steps (default: only at the "
                                "end)"),
    "lora_format": (str, "kohya (default) or diffusers: the layout of an SD3 / SD3.5 LoRA file (PEFT's "
                         "transformer.transformer_blocks.N.attn.to_q.lora_A.weight, for diffusers' load_lora_weights)"),
    "dataset_config": (str, "kohya's dataset config (.toml: [general], [[datasets]], [[datasets.subsets]]) "
                            "instead of --data"),
}


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .trainer import train

    overrides = list(args.set or [])
    for name in _FLAGS:
        value = getattr(args, name)
        if value is not None:
            overrides.append(f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}")
    if args.data is not None:
        overrides.append(f"data.folder={args.data!r}")
    cfg = load_config(args.config, overrides)
    path = train(cfg, resume=args.resume)
    if path is not None:
        print(f"wrote {path}")


def cmd_make_dataset(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..errors import SdlabError
    from .shapes import make_shapes_dataset

    if args.count < 1:
        raise SdlabError(f"--count must be at least 1, got {args.count}")
    if args.size < 8:
        raise SdlabError(f"--size must be at least 8, got {args.size}")
    paths = make_shapes_dataset(Path(args.dir), args.count, size=args.size, seed=args.seed, layout=args.layout,
                                hold_out=args.hold_out)
    print(f"wrote {args.count} images to {paths[0] if args.layout == 'parquet' else args.dir}")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA or an embedding, fine-tune, or train a model from scratch",
                       description="Train as a TOML config says (see docs/training.md). Runs on one process, "
                                   "or on several under 'accelerate launch' / 'torchrun'.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example, a LoRA on a folder of images with .txt captions beside them:\n"
                              "  sdlab train --mode lora --base-model v1-5-pruned-emaonly.safetensors --data imgs/ \\\n"
                              "      --epochs 10 --set lora.rank=16 --set lora.alpha=8 --output-name my-lora\n"
                              "a textual-inversion embedding (OUTPUT_DIR/sksobj.safetensors):\n"
                              "  sdlab train --mode embedding --base-model v1-5-pruned-emaonly.safetensors --data imgs/ \\\n"
                              "      --set embedding.token_string=sksobj --set embedding.init_word=shape\n"
                              "Every config key (kohya's names) can be set with --set KEY=VALUE; "
                              "see sdlab.training.config.TrainConfig.")
    p.add_argument("config", nargs="?", help="the training config (.toml); all of it can also come from --set")
    p.add_argument("--resume", action="store_true", help="continue from the newest state in OUTPUT_DIR/state")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lr=1e-4 --set lora.rank=8 (repeatable)")
    p.add_argument("--data", help="the image folder, or a Hugging Face data set: a .parquet file or a folder of "
                                  "parquet / save_to_disk Arrow files (data.folder)")
    for name, (typ, text) in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=text)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-dataset", help="write a synthetic captioned data set",
                       description="Write captioned images of coloured shapes on coloured backgrounds.")
    p.add_argument("kind", choices=["shapes"], help="the kind of data set")
    p.add_argument("dir", help="output folder")
    p.add_argument("--count", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="images are a pure function of (seed, index)")
    p.add_argument("--layout", choices=["kohya", "jsonl", "parquet"], default="kohya",
                   help="kohya: NAME.png + NAME.txt; jsonl: images + metadata.jsonl; parquet: "
                        "DIR/data/train-00000-of-00001.parquet with image and text columns, as the Hub publishes "
                        "data sets (needs pyarrow) (default kohya)")
    p.add_argument("--hold-out", action="store_true",
                   help="leave out the fixed combinations in sdlab.training.shapes.HELD_OUT, so an evaluation "
                        "can ask for captions the model never saw (the demo recipe does this)")
    p.set_defaults(func=cmd_make_dataset)
