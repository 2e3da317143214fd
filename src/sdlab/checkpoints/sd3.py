"""Loading Stable Diffusion 3 / 3.5: single files (MMDiT + VAE, with or without
`text_encoders.clip_l / clip_g / t5xxl`), separate text-encoder files (ComfyUI's
`models/text_encoders`: clip_l.safetensors, clip_g.safetensors, t5xxl_fp16 / fp8), and diffusers
folders (`transformer/`, `text_encoder{,_2,_3}/`, `tokenizer{,_2,_3}/`, `vae/`, `scheduler/`).

Everything is read into the native single-file layout (the reference's keys), so the MMDiT, the
VAE and the encoders load through the same lazy path as the UNet families (`building.build`).
A diffusers transformer is mapped back by the inverse of diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers`: q, k, v concatenated into `qkv`, and the
(scale, shift) halves of the final layer's and the last context block's modulation swapped back to
the original (shift, scale). `write_sd3_folder` goes the other way (diffusers has no SD3
single-file writer, so `sdlab convert` is the way back in both directions).

Files without a part load as ComfyUI loads them: a VAE from a separate file (`--vae`; SD3.5's
files carry none), and one CLIP alone, the other's part of the conditioning zeros.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..errors import SdlabError
from ..families import FAMILIES, MMDIT_MARKER, UNET_PREFIX, VAE_PREFIX, ModelConfig, sd3_model_config
from ..models.mmdit import MMDiT, MMDiTConfig
from ..models.storage import STORAGE_DTYPES
from ..models.t5 import T5Config, T5Encoder, config_from_state_dict as t5_config
from ..models.vae import config_from_state_dict as vae_config
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
    (`sdlab.config`) when it holds a CLIP (else None: the encoders must come from files)."""
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
    if any(s.layout != "t5" for s in slots):
        cfg = ModelConfig(replace(family, text_encoders=tuple(slots)), mmdit, vae, tuple(tes))
    sd = dfolder._converted(parts, path, {"sdlab.config": cfg.to_json()} if cfg is not None else {})
    if cfg is None:  # the flow shift and latent constants still come from the folder
        sd.metadata["sdlab.sd3_family"] = ModelConfig(replace(family, text_encoders=()), mmdit, vae, ()).to_json()
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


def with_vae_file(sd: StateDict, file: str | Path) -> StateDict:
    """The checkpoint's tensors with a separate VAE file's under `first_stage_model.` in place of
    its own (SD3.5's files carry none): the released layout, with or without that prefix and with
    `loss.*` / `model_ema.*` leftovers, or diffusers' (`encoder.down_blocks.*`), as `--vae` reads
    them for the other families (`models_dir.read_vae`)."""
    path = Path(file).expanduser()
    f = read_state_dict(path)
    keys = [k for k in f.shapes if not k.startswith(("loss.", "model_ema."))]
    if any(k.startswith(VAE_PREFIX) for k in keys):
        plan = {k[len(VAE_PREFIX):]: dk.Derived((k,)) for k in keys if k.startswith(VAE_PREFIX)}
    elif any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        try:
            plan = dk.vae_plan({k: f.shapes[k] for k in keys}, vae_config(f.shapes, layout="diffusers"))
        except SdlabError as e:
            raise SdlabError(f"{path}: {e}") from None
    else:
        plan = {k: dk.Derived((k,)) for k in keys}
    if "encoder.conv_in.weight" not in plan or "decoder.conv_in.weight" not in plan:
        raise SdlabError(f"{path}: not a VAE (no encoder.conv_in / decoder.conv_in weights); give a VAE file with --vae")
    parts = {k: (sd, dk.Derived((k,))) for k in sd.shapes if not k.startswith(VAE_PREFIX)}
    parts.update({VAE_PREFIX + k: (f, d) for k, d in plan.items()})
    return dfolder._converted(parts, sd.path, dict(sd.metadata))


def absent_clip_zeros(cfg: ModelConfig) -> tuple[int, int] | None:
    """For an SD3 model with one of its two CLIPs: how many zeros go before and after the present
    one's features and pooled vector, where the absent one's would be (ComfyUI `SD3ClipModel`: a
    lone CLIP-G is left-padded by CLIP-L's 768, a lone CLIP-L gets CLIP-G's 1280 zeros after it).
    The absent width is what the MMDiT's pooled input leaves (2048 - the present one's): each
    released CLIP's features are as wide as its pooled vector. None with both CLIPs (or for a
    family that is not SD3)."""
    if cfg.family.text_combine != "sd3":
        return None
    clips = [(slot.prefix.split(".")[1], te) for slot, te in zip(cfg.family.text_encoders, cfg.text_encoders)
             if slot.layout != "t5"]
    if len(clips) != 1:
        return None
    name, te = clips[0]
    pooled = te.projection_dim or te.width
    absent = (cfg.unet.adm_in_channels or 0) - pooled
    if absent < 1:
        raise SdlabError(f"{name}'s pooled vector is {pooled} wide but this MMDiT's pooled input is "
                         f"{cfg.unet.adm_in_channels}: leaves no room for the other CLIP; the {name} file is "
                         "for another model")
    return (absent, 0) if name == "clip_g" else (0, absent)


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
        return _build(T5Encoder, te_cfg, entries, dtype, "T5 encoder", path, t5_weight_dtype(entries, dtype, weight_dtype))
    return _build(CLIPTextModel, te_cfg, entries, dtype, "text encoder", path, weight_dtype)


def t5_weight_dtype(entries: Mapping[str, object], dtype: torch.dtype,
                    weight_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype T5's matrices are kept in: the file's where that is narrower than the one asked
    for (a t5xxl_fp8_e4m3fn file stays fp8, an fp16 one fp16, on the CPU too). Each layer upcasts
    its weights exactly as it runs, so widening them would change no result, only hold T5-XXL's
    4.7 B parameters in two or four times the memory."""
    asked = weight_dtype or dtype
    probe = entries.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    stored = getattr(probe, "stored_dtype", None)
    if stored in STORAGE_DTYPES and torch.finfo(stored).bits < torch.finfo(asked).bits:
        return stored
    return weight_dtype


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
         text_encoder_files: Mapping[str, str | Path] | None = None, t5_max_length: int = 77, text_encoder_dirs=None,
         vae_file: str | Path | None = None):
    """The Bundle of an SD3 checkpoint or folder (`loader.load_bundle` calls this). `vae_file`
    supplies the VAE of a checkpoint that carries none; one that has its own keeps it here (the
    pipeline's `use_vae` replaces it, as for every family)."""
    from .building import Bundle, build as _build, take as _take
    from ..device import vae_dtype
    from ..models.vae import AutoencoderKL

    files = {k: v for k, v in (text_encoder_files or {}).items() if v is not None}
    for name, file in find_encoders(sd, text_encoder_dirs).items():
        files.setdefault(name, file)
        log.info("%s: %s from %s", path.name, name, file)
    sd = with_encoder_files(sd, files)
    if vae_file is not None and not any(k.startswith(VAE_PREFIX) for k in sd.shapes):
        sd = with_vae_file(sd, vae_file)
    try:
        cfg = config(sd, files)
        zeros = absent_clip_zeros(cfg)
    except SdlabError as e:
        raise SdlabError(f"{path}: {e}") from None
    if cfg.vae.latent_channels != cfg.unet.in_channels:
        raise SdlabError(f"{path}: the VAE makes {cfg.vae.latent_channels}-channel latents but this MMDiT reads "
                         f"{cfg.unet.in_channels}: give SD3's 16-channel VAE with --vae")
    if zeros is not None:
        absent = "clip_l" if zeros[0] else "clip_g"
        log.info("%s: no %s text encoder; its part of the conditioning is zeros, as ComfyUI does (give one with %s)",
                 path.name, absent, "--clip-l" if absent == "clip_l" else "--clip-g")
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


# ---------------------------------------------------------------- writing a diffusers folder


def mmdit_to_diffusers(sd: Mapping[str, Tensor], cfg: MMDiTConfig) -> dict[str, Tensor]:
    """Native MMDiT tensors as an SD3Transformer2DModel's, by the inverse of `mmdit_plan`: each
    fused `qkv` split into q, k and v, and the two (shift, scale) modulations diffusers keeps as
    (scale, shift) swapped back."""
    out = {}
    for key, plan in mmdit_plan(cfg).items():
        t = sd[key]
        if plan.steps == (dk._concat,):
            out.update(zip(plan.sources, t.chunk(len(plan.sources), dim=0)))
        elif plan.steps in ((), (_swap_halves,)):
            (source,) = plan.sources
            out[source] = _swap_halves(t) if plan.steps else t
        else:
            raise SdlabError(f"internal error: no way back to diffusers for MMDiT key {key}")
    return out


def _transformer_json(cfg: MMDiTConfig, sample_size: int) -> dict:
    """The config.json of the SD3Transformer2DModel that `cfg` is (`mmdit_config_from_diffusers`'s inverse)."""
    if cfg.adm_in_channels is None or cfg.mlp_ratio != 4.0 or cfg.timestep_embed_dim != 256:
        raise SdlabError("this MMDiT has no diffusers equivalent (SD3Transformer2DModel has a pooled input, MLPs 4x "
                         "as wide as the hidden size and a 256-wide timestep embedding)")
    return {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0", "sample_size": sample_size,
            "patch_size": cfg.patch_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "num_layers": cfg.depth, "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.heads,
            "joint_attention_dim": cfg.context_dim, "caption_projection_dim": cfg.hidden_size,
            "pooled_projection_dim": cfg.adm_in_channels, "pos_embed_max_size": cfg.pos_embed_max_size,
            "dual_attention_layers": list(cfg.x_block_self_attn_layers), "qk_norm": "rms_norm" if cfg.qk_norm else None}


def _t5_json(cfg: T5Config, dtype: torch.dtype) -> dict:
    """transformers' T5Config of a T5 v1.1 encoder (gated GELU, no tied LM head)."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
            "is_gated_act": True, "dropout_rate": 0.0, "is_encoder_decoder": False, "use_cache": False,
            "pad_token_id": 0, "eos_token_id": 1, "torch_dtype": str(dtype).removeprefix("torch.")}


def _save_part(folder: Path, weights_name: str, tensors: Mapping[str, Tensor], config_json: dict) -> None:
    from .io import save_safetensors

    folder.mkdir()
    save_safetensors(tensors, folder / weights_name)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))


def write_sd3_folder(sd: Mapping[str, Tensor], cfg: ModelConfig, out: Path, tokenizers: Sequence | None = None,
                     replace_existing: bool = False) -> None:
    """Write an SD3 / SD3.5 model (its native state dict and config) as a diffusers folder that
    `StableDiffusion3Pipeline.from_pretrained` loads: `transformer/`, `vae/` (with its scaling and
    shift factors), `text_encoder{,_2,_3}/` and `tokenizer{,_2,_3}/` for the encoders it has (absent
    ones are null in model_index.json), and `scheduler/` with the model's flow shift.

    Args:
        tokenizers: the bundle's, in its slot order (a folder's own ones are kept); default the
            built-in ones.
        replace_existing: swap out an existing folder once the new one is complete.
    """
    from ..text.t5_tokenizer import T5Tokenizer
    from ..text.tokenizer import CLIPTokenizer

    family = cfg.family

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    def fill(tmp: Path) -> None:
        sample = family.default_size // cfg.vae.downsample_factor
        _save_part(tmp / "transformer", "diffusion_pytorch_model.safetensors",
                   mmdit_to_diffusers(part(UNET_PREFIX), cfg.unet), _transformer_json(cfg.unet, sample))
        vae_json = {**dfolder._vae_json(cfg.vae, family.default_size, family.latent_scale),
                    "shift_factor": family.latent_shift, "use_quant_conv": cfg.vae.use_quant_conv,
                    "use_post_quant_conv": cfg.vae.use_quant_conv}
        _save_part(tmp / "vae", "diffusion_pytorch_model.safetensors", dk.vae_to_diffusers(part(VAE_PREFIX), cfg.vae),
                   vae_json)
        index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
                 "feature_extractor": [None, None], "image_encoder": [None, None],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                 "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
        for slot in FAMILIES["sd3"].text_encoders:
            index[slot.diffusers_folder] = index[slot.tokenizer_folder] = [None, None]
        own = list(tokenizers) if tokenizers is not None else [None] * len(family.text_encoders)
        for slot, te_cfg, tok in zip(family.text_encoders, cfg.text_encoders, own, strict=True):
            weights = part(slot.prefix)
            if slot.layout == "t5":
                dtype = weights["shared.weight"].dtype
                _save_part(tmp / slot.diffusers_folder, "model.safetensors", weights, _t5_json(te_cfg, dtype))
                (tok or T5Tokenizer()).save(tmp / slot.tokenizer_folder)
                index[slot.diffusers_folder] = ["transformers", "T5EncoderModel"]
                index[slot.tokenizer_folder] = ["transformers", "T5TokenizerFast"]
                continue
            weights = dk.clip_to_diffusers(weights, te_cfg)
            if "text_projection.weight" not in weights:
                # CLIPTextModelWithProjection needs one. SD3 pools CLIP-L unprojected; diffusers'
                # own single-file loader gives it this identity for that.
                table = weights["text_model.embeddings.token_embedding.weight"]
                weights["text_projection.weight"] = torch.eye(te_cfg.width, dtype=table.dtype)
                te_cfg = replace(te_cfg, projection_dim=te_cfg.width)
            _save_part(tmp / slot.diffusers_folder, "model.safetensors", weights,
                       dfolder._clip_json(te_cfg, te_cfg.layers, 0 if slot.pad_token == "zero" else 49407, True))
            (tok or CLIPTokenizer(pad_token=slot.pad_token)).save(tmp / slot.tokenizer_folder)
            index[slot.diffusers_folder] = ["transformers", "CLIPTextModelWithProjection"]
            index[slot.tokenizer_folder] = ["transformers", "CLIPTokenizer"]
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0",
            "num_train_timesteps": 1000, "shift": family.flow_shift}, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

    dfolder.write_folder_atomically(out, fill, replace_existing)
