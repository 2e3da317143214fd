"""Loading Stable Diffusion 3 / 3.5: single files (MMDiT + VAE, with or without
`text_encoders.clip_l / clip_g / t5xxl`), separate text-encoder files (ComfyUI's
`models/text_encoders`: clip_l.safetensors, clip_g.safetensors, t5xxl_fp16 / fp8), and diffusers
folders (`transformer/`, `text_encoder{,_2,_3}/`, `tokenizer{,_2,_3}/`, `vae/`, `scheduler/`).

Everything is read into the native single-file layout (the reference's keys), so the MMDiT, the
VAE and the encoders load through the same lazy path as the UNet families (`building.build`).
A diffusers transformer is mapped back by the inverse of diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers`: q, k, v concatenated into `qkv`, and the
(scale, shift) halves of the final layer's and the last context block's modulation swapped back to
the original (shift, scale).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..errors import SdlabError
from ..families import FAMILIES, MMDIT_MARKER, UNET_PREFIX, VAE_PREFIX, ModelConfig, sd3_model_config
from ..models.mmdit import MMDiT, MMDiTConfig
from ..models.t5 import T5Encoder, config_from_state_dict as t5_config
from . import diffusers_folder as dfolder
from . import diffusers_keys as dk
from .io import StateDict, read_state_dict

log = logging.getLogger(__name__)

# The encoders' names as the CLI and ComfyUI's files name them, and their slot in the families.
ENCODER_NAMES = ("clip_l", "clip_g", "t5xxl")
_MARKERS = {"clip_l": "text_model.embeddings.token_embedding.weight",
            "clip_g": "text_model.embeddings.token_embedding.weight",
            "t5xxl": "encoder.final_layer_norm.weight"}


def slot_of(name: str):
    return next(s for s in FAMILIES["sd3"].text_encoders if s.prefix.split(".")[1] == name)


def is_sd3_folder(path: Path) -> bool:
    return dfolder.is_diffusers_folder(path) and (path / "transformer").is_dir()


def is_sd3(sd: StateDict) -> bool:
    return MMDIT_MARKER in sd.shapes


# ---------------------------------------------------------------- diffusers transformer -> original


def _swap_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _source(key: str, cfg: MMDiTConfig) -> dk.Derived:
    """How the native MMDiT tensor `key` is made from a diffusers SD3Transformer2DModel's."""
    fixed = {"pos_embed": "pos_embed.pos_embed", "x_embedder.proj": "pos_embed.proj",
             "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
             "context_embedder": "context_embedder", "final_layer.linear": "proj_out"}
    stem, _, kind = key.rpartition(".")
    if key == "pos_embed":
        return dk.Derived(("pos_embed.pos_embed",))
    if stem in fixed:
        return dk.Derived((f"{fixed[stem]}.{kind}",))
    if stem == "final_layer.adaLN_modulation.1":
        return dk.Derived((f"norm_out.linear.{kind}",), (_swap_halves,))
    parts = stem.split(".")  # joint_blocks.N.{x_block,context_block}.rest...
    i, stream, rest = int(parts[1]), parts[2], ".".join(parts[3:])
    b = f"transformer_blocks.{i}."
    x = stream == "x_block"
    last = i == cfg.depth - 1
    if rest in ("attn.qkv", "attn2.qkv"):
        attn = rest.split(".")[0]
        names = ("to_q", "to_k", "to_v") if x else ("add_q_proj", "add_k_proj", "add_v_proj")
        return dk.Derived(tuple(f"{b}{attn}.{n}.{kind}" for n in names), (dk._concat,))
    single = {
        "attn.proj": "attn.to_out.0" if x else "attn.to_add_out",
        "attn2.proj": "attn2.to_out.0",
        "attn.ln_q": "attn.norm_q" if x else "attn.norm_added_q",
        "attn.ln_k": "attn.norm_k" if x else "attn.norm_added_k",
        "attn2.ln_q": "attn2.norm_q", "attn2.ln_k": "attn2.norm_k",
        "adaLN_modulation.1": "norm1.linear" if x else "norm1_context.linear",
        "mlp.fc1": "ff.net.0.proj" if x else "ff_context.net.0.proj",
        "mlp.fc2": "ff.net.2" if x else "ff_context.net.2",
    }
    if rest not in single:
        raise SdlabError(f"internal error: no diffusers source for MMDiT key {key}")
    src = dk.Derived((f"{b}{single[rest]}.{kind}",))
    if rest == "adaLN_modulation.1" and not x and last:
        return src.then(_swap_halves)  # the pre-only block's (shift, scale), diffusers' (scale, shift)
    return src


def mmdit_plan(cfg: MMDiTConfig) -> dk.Plan:
    """Native MMDiT key -> how to make it from a diffusers transformer's tensors."""
    with torch.device("meta"):
        keys = list(MMDiT(cfg).state_dict())
    return {k: _source(k, cfg) for k in keys}


def mmdit_config_from_diffusers(d: dict) -> MMDiTConfig:
    """The MMDiTConfig of an SD3Transformer2DModel config.json (diffusers' defaults for missing keys)."""
    heads, head_dim = d.get("num_attention_heads", 18), d.get("attention_head_dim", 64)
    hidden = heads * head_dim
    if d.get("caption_projection_dim", hidden) != hidden:
        raise SdlabError(f"caption_projection_dim {d['caption_projection_dim']} differs from the hidden size {hidden}: "
                         "not an SD3 transformer this version can load")
    in_channels = d.get("in_channels", 16)
    return MMDiTConfig(depth=d.get("num_layers", 18), hidden_size=hidden, heads=heads, patch_size=d.get("patch_size", 2),
                       in_channels=in_channels, out_channels=d.get("out_channels") or in_channels,
                       pos_embed_max_size=d.get("pos_embed_max_size") or 96,
                       adm_in_channels=d.get("pooled_projection_dim", 2048), context_dim=d.get("joint_attention_dim", 4096),
                       qk_norm=d.get("qk_norm") == "rms_norm",
                       x_block_self_attn_layers=tuple(d.get("dual_attention_layers") or ()))


def read_sd3_folder(path: Path) -> tuple[StateDict, ModelConfig | None]:
    """A diffusers SD3 folder as a native state dict, with its exact config in the metadata
    (`sdlab.config`) when it holds both CLIPs (else None: the encoders must come from files)."""
    index = dfolder._read_json(path / "model_index.json")
    mmdit = mmdit_config_from_diffusers(dfolder._read_json(path / "transformer" / "config.json"))
    vae_json = dfolder._read_json(path / "vae" / "config.json")
    # SD3's VAE states its latent shift and has no quant convs: the values the SD VAE reader refuses.
    plain = {k: v for k, v in vae_json.items()
             if k not in ("shift_factor", "use_quant_conv", "use_post_quant_conv", "latents_mean", "latents_std")}
    vae = replace(dfolder._vae_config(plain, path / "vae" / "config.json"),
                  use_quant_conv=bool(vae_json.get("use_quant_conv", True)))
    family = FAMILIES["sd3"]
    family = replace(family, latent_scale=float(vae_json.get("scaling_factor") or family.latent_scale),
                     latent_shift=float(vae_json.get("shift_factor") or 0.0))
    sched_path = path / "scheduler" / "scheduler_config.json"
    if sched_path.exists():
        sched = dfolder._read_json(sched_path)
        if sched.get("use_dynamic_shifting"):
            raise SdlabError(f"{sched_path}: use_dynamic_shifting is not supported (SD3 samples with a fixed shift)")
        family = replace(family, flow_shift=float(sched.get("shift", 1.0)))
    if isinstance(mmdit.pos_embed_max_size, int):
        sample = dfolder._read_json(path / "transformer" / "config.json").get("sample_size")
        if isinstance(sample, int):
            family = replace(family, default_size=sample * vae.downsample_factor)

    parts: dict[str, tuple[StateDict, dk.Derived]] = {}
    tr, vw = dfolder._open_weights(path / "transformer"), dfolder._open_weights(path / "vae")
    parts.update({UNET_PREFIX + k: (tr, d) for k, d in mmdit_plan(mmdit).items()})
    parts.update({VAE_PREFIX + k: (vw, d) for k, d in dk.vae_plan(vw.shapes, vae).items()})
    slots, tes = [], []
    for slot in family.text_encoders:
        folder = path / slot.diffusers_folder
        if not dfolder._present(index, slot.diffusers_folder) or not folder.is_dir():
            continue
        weights = dfolder._open_weights(folder)
        te_json = dfolder._read_json(folder / "config.json")
        if slot.layout == "t5":
            cfg = replace(t5_config(weights.shapes),
                          relative_attention_max_distance=te_json.get("relative_attention_max_distance", 128))
            plan = {k: dk.Derived((k,)) for k in weights.shapes}
        else:
            plan = dk.clip_plan(weights.shapes, "openai")
            cfg = dfolder._clip_config(te_json, "openai", False, folder / "config.json")
            if "text_projection.weight" in plan:
                cfg = replace(cfg, projection_dim=weights.shapes[plan["text_projection.weight"].sources[0]][0])
        parts.update({slot.prefix + k: (weights, d) for k, d in plan.items()})
        slots.append(slot)
        tes.append(cfg)
    cfg = None
    if [s.prefix for s in slots[:2]] == [s.prefix for s in family.text_encoders[:2]]:
        cfg = ModelConfig(replace(family, text_encoders=tuple(slots)), mmdit, vae, tuple(tes))
    sd = dfolder._converted(parts, path, {"sdlab.config": cfg.to_json()} if cfg is not None else {})
    if cfg is None:  # the flow shift and latent constants still come from the folder
        sd.metadata["sdlab.sd3_family"] = ModelConfig(family, mmdit, vae, ()).to_json()
    return sd, cfg


# ---------------------------------------------------------------- separate encoder files


def _encoder_prefix(sd: StateDict, name: str) -> str:
    marker = _MARKERS[name]
    hits = [k[:-len(marker)] for k in sd.shapes if k.endswith(marker)]
    if not hits:
        what = "a CLIP text encoder (text_model.*)" if name != "t5xxl" else "a T5 encoder (encoder.block.*)"
        raise SdlabError(f"{sd.path}: not {what}; give {name} as it is in ComfyUI's models/text_encoders")
    return min(hits, key=len)


def with_encoder_files(sd: StateDict, files: Mapping[str, str | Path]) -> StateDict:
    """The checkpoint's tensors with those of separate encoder files put under the slots'
    prefixes (`text_encoders.clip_l.transformer.` ...), replacing the checkpoint's own copy."""
    if not files:
        return sd
    owners: dict[str, tuple[StateDict, str]] = {}
    replaced = []
    for name, file in files.items():
        if name not in ENCODER_NAMES:
            raise SdlabError(f"unknown text encoder {name!r}; one of {', '.join(ENCODER_NAMES)}")
        f = read_state_dict(Path(file).expanduser())
        prefix, slot_prefix = _encoder_prefix(f, name), slot_of(name).prefix
        replaced.append(slot_prefix)
        for k in f.shapes:
            if k.startswith(prefix) and not k.endswith("position_ids"):
                owners[slot_prefix + k[len(prefix):]] = (f, k)
    for k in sd.shapes:
        if not k.startswith(tuple(replaced)):
            owners[k] = (sd, k)
    shapes = {k: src.shapes[key] for k, (src, key) in owners.items()}
    dtypes = {k: src.dtypes[key] for k, (src, key) in owners.items()}
    return StateDict(sd.path, shapes, dtypes, lambda k, dtype: owners[k][0].read(owners[k][1], dtype),
                     dict(sd.metadata))


def config(sd: StateDict, from_files: Mapping[str, object] = ()) -> ModelConfig:
    """The config of an SD3 state dict (a folder's exact one where it has it; `from_files`: the
    encoders that came from separate files, whose configs are read off their shapes)."""
    from ..families import ModelConfig as MC

    if "sdlab.config" in sd.metadata and not from_files:
        return MC.from_json(sd.metadata["sdlab.config"])
    shaped = sd3_model_config(sd.shapes)
    base_json = sd.metadata.get("sdlab.config") or sd.metadata.get("sdlab.sd3_family")
    if base_json is None:
        return shaped
    base = MC.from_json(base_json)  # a folder: its constants, its exact MMDiT and encoder configs
    exact = dict(zip((s.prefix for s in base.family.text_encoders), base.text_encoders))
    names = {slot_of(n).prefix for n in from_files}
    tes = tuple(exact[s.prefix] if s.prefix in exact and s.prefix not in names else te
                for s, te in zip(shaped.family.text_encoders, shaped.text_encoders))
    return ModelConfig(replace(base.family, text_encoders=shaped.family.text_encoders), base.unet, base.vae, tes)


def build_text_encoder(te_cfg, entries, dtype, path, weight_dtype):
    from .building import build as _build
    from ..models.clip import CLIPTextModel

    if hasattr(te_cfg, "d_model"):
        # Files carry the tied token table as `shared.weight`, `encoder.embed_tokens.weight` or both.
        entries = dict(entries)
        table = entries.pop("encoder.embed_tokens.weight", None)
        if table is not None:
            entries.setdefault("shared.weight", table)
        return _build(T5Encoder, te_cfg, entries, dtype, "T5 encoder", path, weight_dtype)
    return _build(CLIPTextModel, te_cfg, entries, dtype, "text encoder", path, weight_dtype)


def tokenizer_for(path: Path, slot, t5_max_length: int):
    """A folder's own tokenizer where it has one, else the built-in one."""
    from ..text.t5_tokenizer import T5Tokenizer
    from .building import tokenizer_for as _tokenizer_for

    if slot.layout != "t5":
        return _tokenizer_for(path, slot, 0)
    folder = path / slot.tokenizer_folder if path.is_dir() else None
    if folder is not None and (folder / "tokenizer.json").exists():
        return T5Tokenizer.from_file(folder, length=t5_max_length)
    return T5Tokenizer(length=t5_max_length)


def find_encoders(sd: StateDict, dirs) -> dict[str, Path]:
    """Encoders the checkpoint lacks, found in `dirs` (ComfyUI's models/text_encoders and
    models/clip) by their usual file names; the first in name order (t5xxl_fp16 before fp8)."""
    found = {}
    for name in ENCODER_NAMES:
        if any(k.startswith(slot_of(name).prefix) for k in sd.shapes):
            continue
        for d in dirs or ():
            hits = sorted(Path(d).glob(f"{name}*.safetensors")) if Path(d).is_dir() else []
            if hits:
                found[name] = hits[0]
                break
    return found


def load(sd: StateDict, path: Path, device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype | None,
         text_encoder_files: Mapping[str, str | Path] | None = None, t5_max_length: int = 77, text_encoder_dirs=None):
    """The Bundle of an SD3 checkpoint or folder (`loader.load_bundle` calls this)."""
    from .building import Bundle, build as _build, take as _take
    from ..device import vae_dtype
    from ..models.vae import AutoencoderKL

    files = {k: v for k, v in (text_encoder_files or {}).items() if v is not None}
    for name, file in find_encoders(sd, text_encoder_dirs).items():
        files.setdefault(name, file)
        log.info("%s: %s from %s", path.name, name, file)
    sd = with_encoder_files(sd, files)
    try:
        cfg = config(sd, files)
    except SdlabError as e:
        raise SdlabError(f"{path}: {e}") from None
    denoiser = _build(MMDiT, cfg.unet, _take(sd, UNET_PREFIX), dtype, "MMDiT", path, weight_dtype)
    vae = _build(AutoencoderKL, cfg.vae, _take(sd, VAE_PREFIX), vae_dtype(device, dtype, cfg.family.name), "VAE", path)
    tes = [build_text_encoder(te_cfg, _take(sd, slot.prefix), dtype, path, weight_dtype)
           for slot, te_cfg in zip(cfg.family.text_encoders, cfg.text_encoders)]
    if not any(s.layout == "t5" for s in cfg.family.text_encoders):
        log.info("%s: no T5 text encoder; conditioning on CLIP-L and CLIP-G alone (give one with --t5)", path.name)
    tokenizers = [tokenizer_for(path, slot, t5_max_length) for slot in cfg.family.text_encoders]
    bundle = Bundle(cfg, denoiser, vae, tes, tokenizers, name=path.stem if path.is_file() else path.name,
                    source=path)
    for net in bundle.networks().values():
        net.to(device).eval().requires_grad_(False)
    return bundle


def info_rows(sd: StateDict, path: Path) -> list[tuple[str, str]]:
    """What `sdlab info` tells of an SD3 checkpoint or folder: the family, the parts' sizes, and
    which text encoders it holds (those it lacks come from --clip-l / --clip-g / --t5)."""
    def count(prefix: str) -> int:
        return sum(math.prod(s) for k, s in sd.shapes.items() if k.startswith(prefix))

    family = FAMILIES["sd3"]
    meta = sd.metadata.get("sdlab.config") or sd.metadata.get("sdlab.sd3_family")
    if meta is not None:
        family = ModelConfig.from_json(meta).family
    from ..families import detect_sd3_family

    detected = detect_sd3_family(sd.shapes)
    family = replace(detected, **{k: getattr(family, k) for k in ("latent_scale", "latent_shift", "flow_shift")})
    rows = [("file", str(path)), ("family", f"{family.name} ({family.label})"),
            ("prediction", f"flow, shift {family.flow_shift:g}"),
            ("latent", f"(z - {family.latent_shift:g}) * {family.latent_scale:g}"),
            ("MMDiT", _human(count(UNET_PREFIX))),
            ("VAE", _human(count(VAE_PREFIX)) if count(VAE_PREFIX) else "missing (give one with --vae)")]
    for name in ENCODER_NAMES:
        n = count(slot_of(name).prefix)
        flag = {"clip_l": "--clip-l", "clip_g": "--clip-g", "t5xxl": "--t5"}[name]
        rows.append((name, _human(n) if n else f"not included (give one with {flag})"))
    dtypes = sorted({str(sd.dtypes[k]).replace("torch.", "") for k in sd.shapes if sd.dtypes[k].is_floating_point})
    rows.append(("dtype", ", ".join(dtypes)))
    return rows


def _human(n: int) -> str:  # as `sdlab info` writes sizes
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
