"""Whole-process peak memory of an SD3 image from an `sd3_medium_incl_clips_t5xxlfp8`-shaped file:
`sdlab generate` against diffusers' `StableDiffusion3Pipeline.from_single_file`.

    HF_HUB_OFFLINE=1 python benchmarks/sd3_memory.py [--size 512] [--steps 2] [--rounds 1]
        [--dir /tmp] [--keep] [--smoke | --depth N --t5-layers N --clip-g-layers N]

Writes one random single file in the layout of the released `sd3_medium_incl_clips_t5xxlfp8`
(~11 GB): the MMDiT under `model.diffusion_model.` (2.03 B parameters), the 16-channel VAE under
`first_stage_model.`, CLIP-L and CLIP-G under `text_encoders.clip_{l,g}.transformer.` (HF layout),
all in fp16, and T5-XXL under `text_encoders.t5xxl.transformer.` in float8_e4m3fn. It is streamed
to disk one tensor at a time (`_common.write_safetensors_streamed`), so writing it takes no more
memory than its largest tensor; the free disk is checked first. Then, each in a fresh process
(run from a measuring child that reports `getrusage(RUSAGE_CHILDREN).ru_maxrss`, the generating
process's lifetime peak RSS, interpreter and imports included), one image: --size x --size,
--steps Euler steps, CFG 5, the same prompt, negative prompt and seed, 77 T5 tokens:

  sdlab      `python -m sdlab generate PROMPT -m FILE ... --device cpu`, with sdlab's defaults on this
             machine (bf16 on CPUs with AVX512-BF16 / AMX, else fp32 compute with fp16 weights; T5
             kept in the file's fp8 and upcast layer by layer); --dtype passes one to it
  diffusers  `StableDiffusion3Pipeline.from_single_file(FILE, config=<local config folder>,
             torch_dtype=torch.bfloat16, local_files_only=True)`, then `pipe(...)`. bf16 because
             it is the narrowest dtype diffusers computes SD3 in on a CPU: without `torch_dtype` it
             would keep each tensor's file dtype, and fp8 matrices cannot be multiplied there;
             fp32 would hold T5-XXL alone in 19 GB. (transformers still keeps T5's `wo` in fp32.)
             The config folder (model_index.json, the components' config.json, tokenizers, the
             scheduler; no weights) is written from sdlab's own diffusers-folder helpers, offline.

The file's pages are read once before each child, so both start from a warm page cache. Reported:
peak RSS of each (median over --rounds), their ratio (target <= 0.7x) and each run's wall time.
`--smoke` shrinks every network to a few layers (seconds, MBs); --depth, --t5-layers and
--clip-g-layers scale the big ones down one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Stopwatch, emit, fmt_bytes, fmt_ratio, print_table, run_child,  # noqa: E402
                     warm_page_cache, write_safetensors_streamed)
from unet_step import OFFLINE_ENV  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 8k"
NEGATIVE = "blurry, low quality"
SEED = 1234
CFG = 5.0
TARGET_RSS = 0.7
FILE_NAME = "sd3_medium_incl_clips_t5xxlfp8-random.safetensors"


# ---------------------------------------------------------------- the model


def model_config(args: argparse.Namespace):
    """SD3-medium with its three encoders as released, or scaled down (`--smoke`, `--depth`, ...)."""
    from sdlab.families import FAMILIES, ModelConfig
    from sdlab.models import clip, mmdit, t5, vae

    clip_l = clip.CLIPTextConfig(layout="openai")  # CLIP-L pools unprojected in SD3
    clip_g = clip.CLIPTextConfig(layout="openai", width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu",
                                 projection_dim=1280)
    t5xxl, unet, ae = t5.PRESETS["t5-xxl"], mmdit.PRESETS["sd3-medium"], vae.PRESETS["sd3"]
    if args.smoke:
        # The same layout in a few MB: CLIP widths 64 + 128 padded to T5's 256, pooled 192.
        clip_l = replace(clip_l, width=64, layers=2, heads=1, mlp_width=128)
        clip_g = replace(clip_g, width=128, layers=2, heads=2, mlp_width=256, projection_dim=128)
        t5xxl = replace(t5xxl, d_model=256, num_heads=4, d_kv=64, d_ff=512, num_layers=2)
        unet = replace(unet, depth=2, hidden_size=128, heads=2, context_dim=256, adm_in_channels=192)
        ae = replace(ae, base_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1)
    if args.depth:
        unet = replace(unet, depth=args.depth, hidden_size=64 * args.depth, heads=args.depth)
    if args.t5_layers:
        t5xxl = replace(t5xxl, num_layers=args.t5_layers)
    if args.clip_g_layers:
        clip_g = replace(clip_g, layers=args.clip_g_layers)
    return ModelConfig(FAMILIES["sd3"], unet, ae, (clip_l, clip_g, t5xxl))


def file_specs(cfg) -> dict[str, tuple[tuple[int, ...], object]]:
    """key -> (shape, dtype) of the single file: the networks built on the meta device for their
    keys and shapes; T5 in fp8 (both token-table keys, as files in the wild carry them), the rest fp16."""
    import torch

    from sdlab.checkpoints.building import skip_init_on_meta
    from sdlab.families import UNET_PREFIX, VAE_PREFIX
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.mmdit import MMDiT
    from sdlab.models.t5 import T5Encoder
    from sdlab.models.vae import AutoencoderKL

    slots = cfg.family.text_encoders
    parts = [(UNET_PREFIX, MMDiT, cfg.unet, torch.float16), (VAE_PREFIX, AutoencoderKL, cfg.vae, torch.float16)]
    parts += [(slot.prefix, T5Encoder if slot.layout == "t5" else CLIPTextModel, te,
               torch.float8_e4m3fn if slot.layout == "t5" else torch.float16)
              for slot, te in zip(slots, cfg.text_encoders)]
    specs = {}
    for prefix, cls, net_cfg, dtype in parts:
        with torch.device("meta"), skip_init_on_meta():
            net = cls(net_cfg)
        specs.update({prefix + k: (tuple(v.shape), dtype if v.is_floating_point() else v.dtype)
                      for k, v in net.state_dict().items()})
        if cls is T5Encoder:
            specs[prefix + "encoder.embed_tokens.weight"] = specs[prefix + "shared.weight"]
    return specs


def write_file(path: Path, cfg) -> int:
    """The random single file, one tensor at a time: each a slice, at a random offset, of one pool
    of N(0, 0.02) noise in that tensor's dtype (what a loader does does not depend on the values)."""
    import torch

    specs = file_specs(cfg)
    gen = torch.Generator().manual_seed(0)
    longest = max(torch.Size(shape).numel() for shape, _ in specs.values())
    base = torch.randn(max(longest, 1 << 20), generator=gen) * 0.02
    pools = {dtype: base.to(dtype) for dtype in {d for _, d in specs.values()}}
    del base

    def tensor_for(key: str):
        shape, dtype = specs[key]
        n = torch.Size(shape).numel()
        start = int(torch.randint(0, pools[dtype].numel() - n + 1, (), generator=gen))
        return pools[dtype][start:start + n].view(shape)

    write_safetensors_streamed(path, specs, tensor_for)  # no metadata: detection runs as for a download
    return path.stat().st_size


def file_bytes(cfg) -> int:
    import torch

    return sum(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
               for shape, dtype in file_specs(cfg).values())


def write_config_folder(out: Path, cfg) -> None:
    """A diffusers SD3 folder without weights, for `from_single_file(config=...)` offline."""
    from sdlab.checkpoints import diffusers_folder as dfolder
    from sdlab.checkpoints.sd3 import _t5_json, _transformer_json
    from sdlab.text.t5_tokenizer import T5Tokenizer
    from sdlab.text.tokenizer import CLIPTokenizer

    import torch

    family = cfg.family
    files = {
        "transformer/config.json": _transformer_json(cfg.unet, family.default_size // cfg.vae.downsample_factor),
        "vae/config.json": {**dfolder._vae_json(cfg.vae, family.default_size, family.latent_scale),
                            "shift_factor": family.latent_shift, "use_quant_conv": False, "use_post_quant_conv": False},
        "scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                            "num_train_timesteps": 1000, "shift": family.flow_shift},
    }
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for slot, te in zip(family.text_encoders, cfg.text_encoders):
        if slot.layout == "t5":
            files[f"{slot.diffusers_folder}/config.json"] = _t5_json(te, torch.bfloat16)
            T5Tokenizer().save(out / slot.tokenizer_folder)
            index[slot.diffusers_folder] = ["transformers", "T5EncoderModel"]
            index[slot.tokenizer_folder] = ["transformers", "T5TokenizerFast"]
            continue
        te = replace(te, projection_dim=te.projection_dim or te.width)  # CLIP-L: diffusers gives it an identity
        files[f"{slot.diffusers_folder}/config.json"] = dfolder._clip_json(
            te, te.layers, 0 if slot.pad_token == "zero" else 49407, with_projection=True)
        CLIPTokenizer(pad_token=slot.pad_token).save(out / slot.tokenizer_folder)
        index[slot.diffusers_folder] = ["transformers", "CLIPTextModelWithProjection"]
        index[slot.tokenizer_folder] = ["transformers", "CLIPTokenizer"]
    files["model_index.json"] = index
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(content, indent=2))


# ---------------------------------------------------------------- the children


def sdlab_command(args: argparse.Namespace, model: Path, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "sdlab", "generate", PROMPT, "-n", NEGATIVE, "-m", str(model), "-W", str(args.size),
           "-H", str(args.size), "--steps", str(args.steps), "--sampler", "Euler", "--schedule", "normal", "--cfg",
           str(CFG), "--seed", str(SEED), "--device", "cpu", "-o", str(out)]
    return cmd + (["--dtype", args.dtype] if args.dtype else [])


def run_diffusers(args: argparse.Namespace) -> None:
    """The diffusers run itself (a grandchild of the parent, measured by its measuring child)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_single_file(args.model, config=args.config, torch_dtype=torch.bfloat16,
                                                     local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=CFG,
                 height=args.size, width=args.size, max_sequence_length=77,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    image.save(args.out)


def measure(args: argparse.Namespace) -> None:
    """Run one generating process and report its peak RSS (it is this process's only child)."""
    out = Path(args.out)
    if args.measure == "sdlab":
        cmd = sdlab_command(args, Path(args.model), out)
    else:
        cmd = [sys.executable, __file__, "--run-diffusers", "--model", args.model, "--config", args.config,
               "--out", str(out), "--size", str(args.size), "--steps", str(args.steps)]
    watch = Stopwatch()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = watch.lap()
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise SystemExit(f"{args.measure} exited {proc.returncode}:\n{tail}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    emit({"peak": peak, "wall": wall, "image": out.exists()})


# ---------------------------------------------------------------- the parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=2, help="Euler steps (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (sdlab, diffusers) children (default 1)")
    parser.add_argument("--dtype", help="sdlab generate --dtype (default: its default on this machine)")
    parser.add_argument("--dir", type=Path, help="where to write the file and config folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the file; a kept file of the right size is reused")
    parser.add_argument("--smoke", action="store_true", help="every network a few layers: check the plumbing")
    parser.add_argument("--depth", type=int, help="MMDiT joint blocks (hidden 64 x depth); default 24")
    parser.add_argument("--t5-layers", type=int, help="T5 blocks (default 24)")
    parser.add_argument("--clip-g-layers", type=int, help="CLIP-G layers (default 32)")
    parser.add_argument("--measure", choices=["sdlab", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--run-diffusers", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)
    if args.run_diffusers:
        run_diffusers(args)
        return
    if args.measure:
        measure(args)
        return

    cfg = model_config(args)
    need = file_bytes(cfg)
    root = args.dir or Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    shape = "smoke" if args.smoke else (f"d{cfg.unet.depth}-t{cfg.text_encoders[2].num_layers}"
                                        f"-g{cfg.text_encoders[1].layers}")
    work = root / f"sdlab-bench-sd3-{shape}"  # a kept file is reused only for the same shape
    model, config = work / FILE_NAME, work / "config"
    reuse = model.exists() and model.stat().st_size >= need
    free = shutil.disk_usage(root).free
    if not reuse and free < need * 1.1 + (1 << 30):
        raise SystemExit(f"{root}: {fmt_bytes(free)} free, the file needs {fmt_bytes(need)} and 1 GiB to spare; "
                         "give --dir on a larger disk")
    work.mkdir(exist_ok=True)
    try:
        watch = Stopwatch()
        if not reuse:
            print(f"writing {model} ({fmt_bytes(need)})", file=sys.stderr, flush=True)
            write_file(model, cfg)
        if config.exists():
            shutil.rmtree(config)
        write_config_folder(config, cfg)
        print(f"  file ready in {watch.lap():.0f} s", file=sys.stderr, flush=True)
        results: dict[str, list[dict]] = {"sdlab": [], "diffusers": []}
        for r in range(args.rounds):
            for lib in results:
                warm_page_cache(model)
                res = run_child([__file__, "--measure", lib, "--model", str(model), "--config", str(config),
                                 "--out", str(work / f"{lib}.png"), "--size", str(args.size), "--steps", str(args.steps),
                                 *(["--dtype", args.dtype] if args.dtype else [])], env=OFFLINE_ENV, timeout=7200)
                results[lib].append(res)
                print(f"  round {r + 1}/{args.rounds} {lib}: peak {fmt_bytes(res['peak'])}, {res['wall']:.0f} s",
                      file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    med = {lib: {k: statistics.median(r[k] for r in rs) for k in ("peak", "wall")} for lib, rs in results.items()}
    rows = [(lib, fmt_bytes(m["peak"]), f"{m['peak'] / need:.2f}x", f"{m['wall']:.0f} s",
             "" if lib == "diffusers" else fmt_ratio(m["peak"], med["diffusers"]["peak"])) for lib, m in med.items()]
    shape = "smoke-sized" if args.smoke else (f"MMDiT depth {cfg.unet.depth}, T5 {cfg.text_encoders[2].num_layers} "
                                              f"blocks, CLIP-G {cfg.text_encoders[1].layers} layers")
    print(f"SD3 txt2img {args.size}x{args.size}, {args.steps} Euler steps, CFG {CFG:g}, from a random "
          f"sd3_medium_incl_clips_t5xxlfp8-shaped file ({shape}, {fmt_bytes(need)}); sdlab "
          f"{args.dtype or 'default dtype'} vs diffusers bf16; median of {args.rounds} round(s), each in a fresh "
          "process\n")
    print_table(["library", "peak RSS", "x file size", "wall", "ratio"], rows)
    print(f"target: peak RSS <= {TARGET_RSS}x diffusers'")


if __name__ == "__main__":
    main()
