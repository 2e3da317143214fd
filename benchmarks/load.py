"""Load time and peak memory of one SD 1.5 or SDXL checkpoint: sdlab's loader against diffusers'.

    HF_HUB_OFFLINE=1 python benchmarks/load.py [--family sd15|sdxl] [--repeat N] [--proposed] [--smoke]

Writes one full-size single-file checkpoint with random fp16 weights to a temporary folder,
without sdlab's config metadata, so family detection runs as for a downloaded file:

  sd15   SD 1.5-shaped: UNet, VAE, CLIP-L (~2 GB)
  sdxl   SDXL base-shaped: UNet (2.57 B parameters), VAE, CLIP-L under
         `conditioner.embedders.0.transformer.`, OpenCLIP bigG under `conditioner.embedders.1.model.`
         (~6.9 GB); streamed to disk one tensor at a time, so writing it needs ~0.4 GB of RAM

Then, each in a fresh child process, loads it in fp16 on the CPU:

  sdlab      `sdlab.checkpoints.loader.load_bundle(path, device="cpu", dtype=torch.float16)`
  diffusers  `StableDiffusionPipeline.from_single_file` (sd15) or `StableDiffusionXLPipeline.from_single_file`
             (sdxl) `(path, config=<local config folder>, torch_dtype=torch.float16, local_files_only=True)`,
             fully offline: the config folder (model_index.json, component config.json files,
             tokenizers, scheduler; no weights) is written from sdlab's own diffusers-folder helpers.

What is measured, inside each child (the interpreter's own start-up, the same for both, is not):
  import      importing torch and the loading library
  load        the load call alone
  read        load + reading every weight page once (one byte per page). safetensors (>= 0.8)
              memory-maps the file lazily, so a loader that makes no copies returns before the
              weights are read; their page faults then land on the first forward pass. Adding
              this phase puts loaders that copy and loaders that do not on equal terms.
  peak RSS    the process's lifetime peak (ru_maxrss / VmHWM), interpreter and imports included,
              after the load call and after the weights were read. Memory-mapped weight pages
              count once they are read: they are file-backed and reclaimable, unlike copies.
              Each is also shown as a multiple of the file size. A loader that copies nothing
              ends at about 1.0x the file size (+ the interpreter) once every weight was read,
              all of it file-backed; one that copies ends near 2x, or at 1x anonymous memory.
              The "RSS at end: anonymous" rows are the copies, the real cost: the kernel can
              drop file-backed pages under memory pressure and fault them back in.

The file's pages are read once before the first child, so every loader starts from a warm page
cache; loaders alternate across rounds and the best round of each is shown. `--proposed` adds
prototypes of changes to sdlab's loader (`proposed_load_bundle`), each as its own column.
Run it by hand, not by pytest; it takes a few minutes and removes its temporary files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Stopwatch, emit, fmt_bytes, fmt_ratio, fmt_seconds, memory, peak_rss,  # noqa: E402
                     print_table, reset_peak_rss, run_child, warm_page_cache, write_safetensors_streamed)

# Targets, per family: sdlab / diffusers for the load call and its peak RSS (sd15), and
# sdlab's peak RSS once all weights were read, as a multiple of the file size (sdxl).
TARGETS = {"sd15": {"time": 0.5, "rss": 0.6}, "sdxl": {"rss_per_file": 1.2}}
FAMILIES = tuple(TARGETS)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error",
               "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
LOADERS = ("sdlab", "diffusers")
# Prototypes of changes to sdlab's loader (--proposed): see `proposed_load_bundle`.
# Each adds one change to the one before it.
PROPOSED = ("sdlab+skip-init", "sdlab+skip-init+vae-fp16", "sdlab+skip-init+vae-fp16+lazy-tok")


# ---------------------------------------------------------------- the model


def model_config(smoke: bool, family_name: str = "sd15"):
    """SD 1.5 or SDXL base as released (or, with --smoke, a tiny model of the same layout to
    check the plumbing)."""
    from sdlab.families import FAMILIES, ModelConfig
    from sdlab.models import clip, unet, vae

    if family_name == "sdxl":
        family = FAMILIES["sdxl"]
        if not smoke:
            return ModelConfig(family, unet.PRESETS["sdxl"], vae.PRESETS["sd"],
                               (clip.PRESETS["clip-l"], clip.PRESETS["openclip-bigg"]))
        # The two encoders need different widths: diffusers tells CLIP-L from bigG by the width.
        # Context = 64 + 128; y = pooled 128 + 6 size numbers x 256.
        return ModelConfig(family,
                           unet.UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
                                           transformer_depth=(0, 2), transformer_depth_middle=2, num_heads=None,
                                           num_head_channels=64, context_dim=192, use_linear_in_transformer=True,
                                           adm_in_channels=128 + 6 * 256),
                           vae.VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1),
                           (clip.CLIPTextConfig(layout="openai", width=64, layers=2, heads=1, mlp_width=128),
                            clip.CLIPTextConfig(layout="openclip", width=128, layers=3, heads=2, mlp_width=256,
                                                activation="gelu", projection_dim=128)))
    family = FAMILIES["sd1"]
    if not smoke:
        return ModelConfig(family, unet.PRESETS["sd15"], vae.PRESETS["sd"], (clip.PRESETS["clip-l"],))
    return ModelConfig(family,
                       unet.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                                       transformer_depth=(1, 0), context_dim=64),
                       vae.VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1),
                       (clip.CLIPTextConfig(layout="openai", width=64, layers=2, heads=1, mlp_width=128),))


def write_checkpoint(path: Path, smoke: bool, family_name: str = "sd15") -> None:
    """Random fp16 weights in the single-file layout, one network at a time to keep memory low."""
    if family_name == "sdxl":
        write_checkpoint_streamed(path, model_config(smoke, family_name))
        return
    import torch

    from sdlab.checkpoints.io import save_safetensors
    from sdlab.families import UNET_PREFIX, VAE_PREFIX
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNet
    from sdlab.models.vae import AutoencoderKL

    cfg = model_config(smoke)
    slot = cfg.family.text_encoders[0]
    parts = ((UNET_PREFIX, UNet, cfg.unet), (VAE_PREFIX, AutoencoderKL, cfg.vae),
             (slot.prefix, CLIPTextModel, cfg.text_encoders[0]))
    tensors = {}
    torch.manual_seed(0)
    for prefix, cls, net_cfg in parts:
        net = cls(net_cfg)
        tensors.update({prefix + k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()})
        del net
    # Released SD 1.x files also carry this constant buffer; both loaders must cope with it.
    tensors[slot.prefix + "text_model.embeddings.position_ids"] = torch.arange(
        cfg.text_encoders[0].max_positions, dtype=torch.int64)[None]
    save_safetensors(tensors, path)  # no metadata: detection runs as for a downloaded file


def write_checkpoint_streamed(path: Path, cfg) -> None:
    """The file written one tensor at a time (`write_safetensors_streamed`), never holding a
    network in memory: an fp32 SDXL UNet alone is 10 GB. The networks are built on the meta
    device only for their keys and shapes. Each floating-point tensor is a slice, at a random
    offset, of one pool of N(0, 0.02) fp16 noise (128 MiB, longer than the largest tensor),
    which writes at disk speed; what a loader does with a tensor does not depend on its values."""
    import torch

    from sdlab.checkpoints.building import skip_init_on_meta as _skip_init_on_meta
    from sdlab.families import UNET_PREFIX, VAE_PREFIX
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNet
    from sdlab.models.vae import AutoencoderKL

    parts = [(UNET_PREFIX, UNet, cfg.unet), (VAE_PREFIX, AutoencoderKL, cfg.vae)]
    parts += [(slot.prefix, CLIPTextModel, c) for slot, c in zip(cfg.family.text_encoders, cfg.text_encoders)]
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for prefix, cls, net_cfg in parts:
        with torch.device("meta"), _skip_init_on_meta():
            net = cls(net_cfg)
        specs.update({prefix + k: (tuple(v.shape), torch.float16 if v.is_floating_point() else v.dtype)
                      for k, v in net.state_dict().items()})
    # Released SDXL files also carry CLIP-L's position ids and bigG's logit scale; both loaders
    # must cope with them.
    constants = {}
    for slot, c in zip(cfg.family.text_encoders, cfg.text_encoders):
        if slot.layout == "openai":
            constants[slot.prefix + "text_model.embeddings.position_ids"] = torch.arange(
                c.max_positions, dtype=torch.int64)[None]
        else:
            constants[slot.prefix + "logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    specs.update({k: (tuple(v.shape), v.dtype) for k, v in constants.items()})

    gen = torch.Generator().manual_seed(0)
    longest = max(torch.Size(shape).numel() for shape, _ in specs.values())
    pool = (torch.randn(max(longest, 1 << 26), generator=gen) * 0.02).half()

    def tensor_for(key: str):
        if key in constants:
            return constants[key]
        shape, _ = specs[key]
        n = torch.Size(shape).numel()
        start = int(torch.randint(0, pool.numel() - n + 1, (), generator=gen))
        return pool[start:start + n].view(shape)

    write_safetensors_streamed(path, specs, tensor_for)  # no metadata: detection runs as for a download


def write_config_folder(out: Path, smoke: bool, family_name: str = "sd15") -> None:
    """A diffusers folder without weights, for `from_single_file(config=...)` offline."""
    from sdlab.checkpoints.diffusers_folder import _clip_json, _unet_json, _vae_json
    from sdlab.text.tokenizer import CLIPTokenizer

    cfg = model_config(smoke, family_name)
    family = cfg.family
    unet_json = _unet_json(cfg.unet, family.default_size // cfg.vae.downsample_factor)
    # diffusers' single-file UNet converter needs scalars where every level agrees (as in the
    # released SD 1.5 config); `from_pretrained` takes the per-level lists `_unet_json` writes.
    for key in ("layers_per_block", "attention_head_dim", "transformer_layers_per_block"):
        if isinstance(unet_json.get(key), list) and len(set(unet_json[key])) == 1:
            unet_json[key] = unet_json[key][0]
    files = {
        "unet/config.json": unet_json,
        "vae/config.json": _vae_json(cfg.vae, family.default_size, family.latent_scale),
    }
    for slot, te_cfg in zip(family.text_encoders, cfg.text_encoders):
        # SDXL's second encoder is bigG with its projection; SDXL folders keep all its layers.
        files[f"{slot.diffusers_folder}/config.json"] = _clip_json(
            te_cfg, te_cfg.layers, 0 if slot.pad_token == "zero" else 49407,
            with_projection=slot.diffusers_folder == "text_encoder_2")
    if family_name == "sdxl":
        files["scheduler/scheduler_config.json"] = {
            "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
            "prediction_type": "epsilon", "timestep_spacing": "leading", "interpolation_type": "linear"}
        files["model_index.json"] = {
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
            "feature_extractor": [None, None], "image_encoder": [None, None], "force_zeros_for_empty_prompt": False,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    else:
        files["scheduler/scheduler_config.json"] = {
            "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
            "skip_prk_steps": True, "set_alpha_to_one": False, "prediction_type": "epsilon"}
        files["model_index.json"] = {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
            "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(content, indent=2))
    for slot in family.text_encoders:
        CLIPTokenizer(pad_token=slot.pad_token).save(out / slot.tokenizer_folder)


# ---------------------------------------------------------------- prototypes of loader changes


def proposed_load_bundle(path: Path, dtype, variant: str):
    """`load_bundle` for this file (SD 1.x, no EMA) with the changes proposed for
    `sdlab/checkpoints/loader.py`, to measure them before anyone edits the loader:

    1. build the networks on the meta device without running their initialisers
       (`_skip_meta_init`): `nn.Embedding`'s `normal_` on a meta tensor goes through a Python
       decomposition that imports `torch._dynamo` (and sympy): about a second and ~70 MiB;
    2. (`+vae-fp16`) keep the VAE in the requested dtype instead of casting it to fp32 on the
       CPU: the cast reads the VAE's pages and makes a 335 MiB fp32 copy;
    3. (`+lazy-tok`) build the tokenizer on first use: building the CLIP BPE (parsing 48,894
       merges) takes 0.1-0.2 s, which then moves from the load to the first prompt.
    """
    import torch

    from sdlab.checkpoints import loader as L
    from sdlab.families import UNET_PREFIX, VAE_PREFIX
    from sdlab.models.clip import CLIPTextModel
    from sdlab.models.unet import UNet
    from sdlab.models.vae import AutoencoderKL

    sd, path = L.open_model(path)
    cfg = L.config_of(sd)
    vae_dtype = dtype if "+vae-fp16" in variant else torch.float32
    with _skip_meta_init():
        unet = L._build(UNet, cfg.unet, L._take(sd, UNET_PREFIX), dtype, "UNet", path)
        vae = L._build(AutoencoderKL, cfg.vae, L._take(sd, VAE_PREFIX), vae_dtype, "VAE", path)
        tes = [L._build(CLIPTextModel, c, L._take(sd, slot.prefix), dtype, "text encoder", path)
               for slot, c in zip(cfg.family.text_encoders, cfg.text_encoders)]
    tokenizers = [_LazyTokenizer(lambda slot=slot, i=i: L._tokenizer_for(path, slot, i)) if "+lazy-tok" in variant
                  else L._tokenizer_for(path, slot, i) for i, slot in enumerate(cfg.family.text_encoders)]
    bundle = L.Bundle(cfg, unet, vae, tes, tokenizers, name=path.stem, source=path)
    for net in bundle.networks().values():
        net.eval().requires_grad_(False)
    return bundle


class _LazyTokenizer:
    """Stands in for a CLIPTokenizer and builds it on first use."""

    def __init__(self, make):
        self._make, self._tok = make, None

    def __getattr__(self, name):
        if self._tok is None:
            self._tok = self._make()
        return getattr(self._tok, name)

    def __call__(self, texts):
        return self.__getattr__("__call__")(texts)


def _skip_meta_init():
    """The loader's own guard (see `sdlab.checkpoints.building.skip_init_on_meta`)."""
    from sdlab.checkpoints.building import skip_init_on_meta as _skip_init_on_meta

    return _skip_init_on_meta()


# ---------------------------------------------------------------- one child per measurement


def read_all_weights(modules) -> int:
    """Read every page of every weight once (one byte per 4 KiB page, so no copy is made);
    returns the bytes covered. Tied tensors are read once."""
    import torch

    seen, total = set(), 0
    with torch.no_grad():
        for t in itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules):
            if t.numel() == 0 or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if t.is_contiguous():
                raw = t.detach().reshape(-1).view(torch.uint8)
                raw[::4096].sum()
                raw[-1:].sum()
            else:
                t.sum()
            total += t.numel() * t.element_size()
    return total


def child(loader: str, path: Path, config_dir: Path, family_name: str = "sd15") -> None:
    watch = Stopwatch()
    import torch

    if loader.startswith("sdlab"):
        from sdlab.checkpoints.loader import load_bundle
    else:
        import transformers  # noqa: F401  # imported lazily by diffusers otherwise; count it here
        if family_name == "sdxl":
            from diffusers import StableDiffusionXLPipeline as Pipeline
        else:
            from diffusers import StableDiffusionPipeline as Pipeline
    import_s = watch.lap()
    rss_imported = memory().get("rss", 0)
    reset_peak_rss()

    if loader == "sdlab":
        bundle = load_bundle(path, device="cpu", dtype=torch.float16)
        nets = bundle.networks()
    elif loader.startswith("sdlab"):
        bundle = proposed_load_bundle(path, torch.float16, loader)
        nets = bundle.networks()
    else:
        pipe = Pipeline.from_single_file(str(path), config=str(config_dir), torch_dtype=torch.float16,
                                         local_files_only=True)
        nets = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
        if family_name == "sdxl":
            nets["text_encoder_2"] = pipe.text_encoder_2
    load_s = watch.lap()
    after_load = {**memory(), "lifetime_peak": peak_rss()}

    # The same numbers must have arrived in both loaders: checked on the UNet's first convolution.
    conv_in = nets["unet"].input_blocks[0][0].weight if loader.startswith("sdlab") else nets["unet"].conv_in.weight
    weight_bytes = read_all_weights(nets.values())
    read_s = watch.lap()
    after_read = {**memory(), "lifetime_peak": peak_rss()}
    emit({"loader": loader, "import_s": import_s, "load_s": load_s, "read_s": read_s,
          "rss_imported": rss_imported, "after_load": after_load, "after_read": after_read,
          "weight_bytes": weight_bytes, "dynamo_imported": "torch._dynamo" in sys.modules,
          "conv_in_sum": conv_in.double().sum().item(),
          "params": {k: sum(p.numel() for p in m.parameters()) for k, m in nets.items()},
          "dtypes": {k: str(next(m.parameters()).dtype).replace("torch.", "") for k, m in nets.items()}})


# ---------------------------------------------------------------- the parent


def best(runs: list[dict], get) -> float:
    return min(get(r) for r in runs)


def report(results: dict[str, list[dict]], file_size: int, family_name: str = "sd15") -> None:
    """One table: each loader's best round, and each sdlab variant as a ratio to diffusers."""
    ours = [name for name in results if name != "diffusers"]
    targets = TARGETS[family_name]
    per_file = lambda get: lambda r: get(r) / file_size
    fmt_per_file = lambda x: f"{x:.2f}x"
    measures = [
        ("import (torch + library)", lambda r: r["import_s"], fmt_seconds, None),
        ("load call", lambda r: r["load_s"], fmt_seconds, targets.get("time")),
        ("load + read all weights", lambda r: r["load_s"] + r["read_s"], fmt_seconds, None),
        ("import + load + read", lambda r: r["import_s"] + r["load_s"] + r["read_s"], fmt_seconds, None),
        ("peak RSS after load", lambda r: r["after_load"]["lifetime_peak"], fmt_bytes, targets.get("rss")),
        ("peak RSS after reading all weights", lambda r: r["after_read"]["lifetime_peak"], fmt_bytes, None),
        ("  of which added by load + read", lambda r: r["after_read"]["peak"] - r["rss_imported"], fmt_bytes, None),
        ("RSS after imports", lambda r: r["rss_imported"], fmt_bytes, None),
        ("RSS at end: anonymous (copies)", lambda r: r["after_read"].get("anon", 0), fmt_bytes, None),
        ("RSS at end: file-backed (mmap)", lambda r: r["after_read"].get("file", 0), fmt_bytes, None),
        ("weights held (params + buffers)", lambda r: r["weight_bytes"], fmt_bytes, None),
        # As multiples of the file size (the sdxl target is on the second: every weight resident).
        ("peak RSS after load / file size", per_file(lambda r: r["after_load"]["lifetime_peak"]), fmt_per_file, None),
        ("peak RSS after reading all / file size", per_file(lambda r: r["after_read"]["lifetime_peak"]),
         fmt_per_file, targets.get("rss_per_file")),
        ("RSS at end: anonymous / file size", per_file(lambda r: r["after_read"].get("anon", 0)), fmt_per_file, None),
    ]
    headers = [""]
    for name in ours:
        # Proposed variants are cumulative; each column is headed by the change it adds.
        headers += [name if name == "sdlab" else "+" + name.rsplit("+", 1)[1], "/diffusers"]
    headers += ["diffusers", "target"]
    rows = []
    for label, get, fmt, target in measures:
        theirs = best(results["diffusers"], get)
        row = [label]
        for name in ours:
            value = best(results[name], get)
            # A ratio of two multiples of the file size would repeat the bytes row's ratio.
            row += [fmt(value), "" if fmt is fmt_per_file else fmt_ratio(value, theirs)]
        rows.append(row + [fmt(theirs), f"<= {target:.2f}x" if target else ""])
    rounds = len(results["diffusers"])
    what = {"sd15": "an SD 1.5", "sdxl": "an SDXL base"}[family_name]
    print()
    print_table(headers, rows,
                title=f"Loading {what} checkpoint, fp16, CPU: file {fmt_bytes(file_size)} ({file_size:,} bytes), "
                      f"best of {rounds} round{'s' * (rounds > 1)}, {os.cpu_count()} CPUs")
    if len(ours) > 1:
        print("  +COLUMN: a prototype of a loader change (benchmarks/load.py proposed_load_bundle), "
              "each adding one change to the column on its left")
    for name, runs in results.items():
        r = runs[0]
        nets = ", ".join(f"{k} {v / 1e6:.1f}M {r['dtypes'][k]}" for k, v in r["params"].items())
        dynamo = "; imported torch._dynamo" if r["dynamo_imported"] else ""
        print(f"  {name}: {nets}; UNet conv_in sum {r['conv_in_sum']:.6f}{dynamo}")
        if rounds > 1:
            times = ", ".join(f"{r['load_s']:.2f}" for r in runs)
            print(f"    load call per round: {times} s (median {statistics.median(r['load_s'] for r in runs):.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="sd15",
                        help="the checkpoint's layout: SD 1.5 (~2 GB) or SDXL base (~6.9 GB, fp16)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every loader; the best round is shown")
    parser.add_argument("--proposed", action="store_true",
                        help=f"also measure prototypes of loader changes: {', '.join(PROPOSED)}")
    parser.add_argument("--smoke", action="store_true", help="a tiny model of the same layout: checks the plumbing")
    parser.add_argument("--child", choices=[*LOADERS, *PROPOSED, "write"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "write":
        write_checkpoint(args.path, args.smoke, args.family)
        emit({"written": str(args.path)})
        return
    if args.child:
        child(args.child, args.path, args.config_dir, args.family)
        return

    os.environ.update(OFFLINE_ENV)
    loaders = [*LOADERS, *PROPOSED] if args.proposed else list(LOADERS)
    tmp = Path(tempfile.mkdtemp(prefix="sdlab-bench-load-"))
    try:
        path, config_dir = tmp / f"{args.family}-random.safetensors", tmp / "diffusers-config"
        child_args = ["--smoke"] if args.smoke else []
        child_args += ["--family", args.family]
        watch = Stopwatch()
        run_child([__file__, "--child", "write", "--path", str(path), *child_args], OFFLINE_ENV)
        print(f"wrote {path.name}: {fmt_bytes(path.stat().st_size)} in {watch.lap():.1f} s", flush=True)
        write_config_folder(config_dir, args.smoke, args.family)
        print(f"read it once to warm the page cache: {warm_page_cache(path):.1f} s", flush=True)

        results: dict[str, list[dict]] = {name: [] for name in loaders}
        for round_ in range(args.repeat):
            for name in loaders:
                r = run_child([__file__, "--child", name, "--path", str(path), "--config-dir", str(config_dir),
                               *child_args], OFFLINE_ENV)
                results[name].append(r)
                print(f"round {round_ + 1}: {name:24s} import {r['import_s']:.2f} s, load {r['load_s']:.2f} s, "
                      f"read {r['read_s']:.2f} s, peak {fmt_bytes(r['after_read']['lifetime_peak'])}", flush=True)
        report(results, path.stat().st_size, args.family)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
