"""Diffusers folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...):
read into the native single-file layout, and written from it so that diffusers'
`from_pretrained` loads the result."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..errors import SdlabError
from ..families import FAMILIES, UNET_PREFIX, VAE_PREFIX, Family, ModelConfig, size_embed_dim_from_shapes
from ..models.clip import CLIPTextConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from . import diffusers_keys as dk
from .io import StateDict, read_state_dict, save_safetensors

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").exists()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SdlabError(f"{path}: missing; the diffusers folder is incomplete") from None
    except json.JSONDecodeError as e:
        raise SdlabError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _open_weights(folder: Path) -> StateDict:
    """The weights of one diffusers sub-folder, opened lazily: safetensors preferred, sharded or not."""
    for stem in _WEIGHT_NAMES:
        for suffix in (".safetensors", ".bin"):
            index = folder / f"{stem}{suffix}.index.json"
            if index.exists():
                shards = sorted(set(_read_json(index)["weight_map"].values()))
                return _joined([read_state_dict(folder / shard) for shard in shards], folder)
            single = folder / f"{stem}{suffix}"
            if single.exists():
                return read_state_dict(single)
    raise SdlabError(f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors or model.safetensors)")


def _joined(shards: list[StateDict], folder: Path) -> StateDict:
    """The shards of one sub-folder as one lazy state dict."""
    owner = {k: shard for shard in shards for k in shard}
    return StateDict(folder, {k: sd.shapes[k] for k, sd in owner.items()}, {k: sd.dtypes[k] for k, sd in owner.items()},
                     lambda key, dtype: owner[key].read(key, dtype))


def _converted(parts: dict[str, tuple[StateDict, dk.Derived]], path: Path, metadata: dict[str, str]) -> StateDict:
    """The native state dict that `parts` (native key -> a sub-folder's weights and the plan of
    that tensor) describe, made one tensor at a time as it is read, and cast as it is read.

    Each read maps only its sources (`io._read_safetensors`), and nothing here keeps them. A
    dict of the folder's tensors, held while the networks were built, kept every page read
    resident next to its converted copy: loading SD 1.5 for bf16 inference peaked at 4.4 GiB
    from an fp16 folder and 5.8 GiB from an fp32 one, against 2.4 and 2.7 GiB this way
    (`perf.load_for_inference`, 2-core EPYC)."""
    def meta(weights: StateDict, plan: dk.Derived) -> Tensor:  # shape and dtype without reading
        return plan.make([torch.empty(weights.shapes[s], dtype=weights.dtypes[s], device="meta") for s in plan.sources])

    made = {k: meta(weights, plan) for k, (weights, plan) in parts.items()}

    def get(key: str, dtype: torch.dtype | None) -> Tensor:
        weights, plan = parts[key]
        return plan.make([weights.read(s, dtype) for s in plan.sources])  # every step commutes with the cast

    return StateDict(path, {k: tuple(t.shape) for k, t in made.items()}, {k: t.dtype for k, t in made.items()},
                     get, metadata)


# Options of diffusers' networks whose value sdlab's networks have built in: the value of every
# released SD model and diffusers' default. A folder that states another is a different network,
# so it is refused rather than read as if it said the default. What sdlab's networks do vary
# (widths, depths, heads, groups, the size-embedding width) is read from the config instead.
_UNET_BUILT_IN = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
_VAE_BUILT_IN = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                 "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True}
_CLIP_BUILT_IN = {"layer_norm_eps": 1e-5}


def _refuse_other_values(d: dict, built_in: dict, where: Path) -> None:
    for key, value in built_in.items():
        stated = d.get(key, value)
        if any(v != value for v in (stated if isinstance(stated, list) else [stated])):
            raise SdlabError(f"{where}: {key} = {json.dumps(stated)} is not supported (sdlab's network has "
                             f"{json.dumps(value)} built in, as every released Stable Diffusion model)")


def _unet_config(d: dict, where: Path) -> UNetConfig:
    """The UNetConfig of a UNet2DConditionModel config.json; missing keys mean diffusers' defaults."""
    _refuse_other_values(d, _UNET_BUILT_IN, where)
    down_types = list(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up_types = list(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    mid_type = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    plain = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D",
             "UNetMidBlock2DCrossAttn", "UNetMidBlock2D"}
    if not set(down_types + up_types + [mid_type]) <= plain or d.get("addition_embed_type") not in (None, "text_time"):
        raise SdlabError(f"{where}: blocks {down_types}, {mid_type}, {up_types} with addition_embed_type "
                         f"{d.get('addition_embed_type')!r} are not an SD / SDXL UNet this version can load")
    bo = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(bo)
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * levels  # noqa: E731
    depth_per_level = per_level(d.get("transformer_layers_per_block", 1))
    context_dim = d.get("cross_attention_dim", 1280)
    if any(isinstance(v, (list, tuple)) for v in depth_per_level) or isinstance(context_dim, (list, tuple)):
        raise SdlabError(f"{where}: transformer depths or cross-attention widths that differ from block to block "
                         "are not supported")
    has_attn = [t.startswith("CrossAttn") for t in down_types]
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # diffusers' "head dim" is the head count
    if isinstance(heads, (list, tuple)):
        # Only the widths with attention must agree (the middle block uses the last level's heads).
        attended = [(c, h) for c, h, a in zip(bo, heads, has_attn) if a]
        attended += [(bo[-1], heads[-1])] if mid_type == "UNetMidBlock2DCrossAttn" else []
        head_channels = {c // h for c, h in attended}
        if len(head_channels) != 1:
            raise SdlabError(f"{where}: attention heads {heads} for channels {bo} are not one head width")
        num_heads, num_head_channels = None, head_channels.pop()
    else:
        num_heads, num_head_channels = int(heads), None
    adm = d.get("projection_class_embeddings_input_dim") if d.get("addition_embed_type") == "text_time" else None
    # Without addition_time_embed_dim diffusers cannot build the UNet; the reader derives it then.
    size = d.get("addition_time_embed_dim") if adm is not None else None
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
        model_channels=bo[0], channel_mult=tuple(c // bo[0] for c in bo),
        num_res_blocks=per_level(d.get("layers_per_block", 2)),
        transformer_depth=tuple(depth if attn else 0 for depth, attn in zip(depth_per_level, has_attn)),
        transformer_depth_middle=0 if mid_type == "UNetMidBlock2D" else depth_per_level[-1],
        num_heads=num_heads, num_head_channels=num_head_channels,
        context_dim=context_dim, use_linear_in_transformer=d.get("use_linear_projection", False),
        adm_in_channels=adm, norm_groups=d.get("norm_num_groups", 32), **({"size_embed_dim": size} if size else {}),
    )


def _vae_config(d: dict, where: Path) -> VAEConfig:
    """The VAEConfig of an AutoencoderKL config.json; missing keys mean diffusers' defaults."""
    _refuse_other_values(d, _VAE_BUILT_IN, where)
    bo = list(d.get("block_out_channels", (64,)))
    blocks = set(d.get("down_block_types", ())) | set(d.get("up_block_types", ()))
    if not blocks <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise SdlabError(f"{where}: blocks {sorted(blocks)} are not an SD VAE this version can load")
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                     latent_channels=d.get("latent_channels", 4), base_channels=bo[0],
                     channel_mult=tuple(c // bo[0] for c in bo), num_res_blocks=d.get("layers_per_block", 1),
                     norm_groups=d.get("norm_num_groups", 32))


def _clip_config(d: dict, layout: str, extra_layer: bool, where: Path) -> CLIPTextConfig:
    _refuse_other_values(d, _CLIP_BUILT_IN, where)
    return CLIPTextConfig(
        layout=layout, vocab_size=d["vocab_size"], width=d["hidden_size"],
        layers=d["num_hidden_layers"] + int(extra_layer), heads=d["num_attention_heads"],
        mlp_width=d["intermediate_size"], max_positions=d.get("max_position_embeddings", 77),
        activation=d.get("hidden_act", "quick_gelu"),
        projection_dim=(d.get("projection_dim") or d["hidden_size"]) if layout == "openclip" else None,
        eos_token_id=d.get("eos_token_id", 49407) if d.get("eos_token_id", 2) != 2 else 49407,
    )


def tokenizer_pad_token(folder: Path, vocab: Mapping[str, int], default: str) -> str:
    """"eos" or "zero" (id 0 in `vocab`): the pad token a diffusers tokenizer folder names,
    `default` where it names none. Released SD 2.x / SDXL folders pad OpenCLIP's prompts with "!"
    (id 0), but the tiny test pipelines pad both of SDXL's with <|endoftext|>, and their pipelines
    condition on that."""
    from ..text.tokenizer import EOS

    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # transformers' precedence
        pad = _read_json(folder / name).get("pad_token") if (folder / name).exists() else None
        pad = pad.get("content") if isinstance(pad, dict) else pad  # an AddedToken, written out
        if pad is None:
            continue
        if pad == EOS:
            return "eos"
        if vocab.get(pad) == 0:
            return "zero"
        raise SdlabError(f"{folder / name}: pad_token {pad!r} is not supported; "
                         "this version pads prompts with <|endoftext|> or with token 0")
    return default


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and entry and entry[0] is not None


def _family_of_folder(index: dict, unet_cfg: UNetConfig, te_json: dict | None, prediction: str) -> Family:
    inpaint = unet_cfg.in_channels == 9
    if _present(index, "text_encoder_2"):
        name = "sdxl-inpaint" if inpaint else ("sdxl" if _present(index, "text_encoder") else "sdxl-refiner")
    elif te_json is not None and te_json.get("hidden_act") == "gelu":
        # SD 2.x is the family whose text encoder is OpenCLIP (GELU); SD 1.x's is OpenAI CLIP (quick GELU).
        name = "sd2-inpaint" if inpaint else ("sd2-v" if prediction == "v_prediction" else "sd2")
    else:
        name = "sd1-inpaint" if inpaint else "sd1"
    family = FAMILIES[name]
    if prediction == "v_prediction" and family.prediction != "v":
        family = replace(family, prediction="v")
    return family


def read_diffusers_folder(path: Path) -> tuple[StateDict, ModelConfig]:
    """A diffusers Stable Diffusion (XL) folder as a native state dict plus its exact config."""
    index = _read_json(path / "model_index.json")
    unet_json = _read_json(path / "unet" / "config.json")
    unet_cfg = _unet_config(unet_json, path / "unet" / "config.json")
    vae_json = _read_json(path / "vae" / "config.json")
    vae_cfg = _vae_config(vae_json, path / "vae" / "config.json")
    sched = {}
    if (path / "scheduler" / "scheduler_config.json").exists():
        sched = _read_json(path / "scheduler" / "scheduler_config.json")
    te_json = _read_json(path / "text_encoder" / "config.json") if _present(index, "text_encoder") else None
    family = _family_of_folder(index, unet_cfg, te_json, sched.get("prediction_type", "epsilon"))
    family = _with_schedule(family, sched, path / "scheduler" / "scheduler_config.json")
    if vae_json.get("scaling_factor") is not None and abs(vae_json["scaling_factor"] - family.latent_scale) > 1e-6:
        family = replace(family, latent_scale=float(vae_json["scaling_factor"]))
    # The size diffusers' pipelines generate when none is asked for.
    if isinstance(unet_json.get("sample_size"), int):
        family = replace(family, default_size=unet_json["sample_size"] * vae_cfg.downsample_factor)

    parts: dict[str, tuple[StateDict, dk.Derived]] = {}
    unet_weights, vae_weights = _open_weights(path / "unet"), _open_weights(path / "vae")
    parts.update({UNET_PREFIX + k: (unet_weights, d) for k, d in dk.unet_plan(unet_weights.shapes, unet_cfg).items()})
    parts.update({VAE_PREFIX + k: (vae_weights, d) for k, d in dk.vae_plan(vae_weights.shapes, vae_cfg).items()})
    te_cfgs = []
    # Only SD 2.x folders drop OpenCLIP's last layer (their pipelines read the last hidden
    # state); SDXL folders keep every layer and read the penultimate one.
    sd2 = family.name.startswith("sd2")
    for slot in family.text_encoders:
        folder = path / slot.diffusers_folder
        te_cfgs.append(_clip_config(_read_json(folder / "config.json"), slot.layout, sd2, folder / "config.json"))
        te_weights = _open_weights(folder)
        parts.update({slot.prefix + k: (te_weights, d)
                      for k, d in dk.clip_plan(te_weights.shapes, slot.layout, append_identity_layer=sd2).items()})
    if family.size_numbers and unet_cfg.adm_in_channels and unet_json.get("addition_time_embed_dim") is None:
        # diffusers cannot build such a UNet; read the width off the shapes, as for a single file.
        size_embed_dim = size_embed_dim_from_shapes(unet_cfg.adm_in_channels, family, te_cfgs[-1])
        unet_cfg = replace(unet_cfg, size_embed_dim=size_embed_dim)
    try:
        cfg = ModelConfig(family, unet_cfg, vae_cfg, tuple(te_cfgs))
    except ValueError as e:
        raise SdlabError(f"{path}: the unet and text encoder configs disagree ({e}); "
                         "fix the folder's config.json files") from None
    return _converted(parts, path, {"sdlab.config": cfg.to_json()}), cfg


def _with_schedule(family: Family, sched: dict, where: Path) -> Family:
    """The family with the training schedule a scheduler config states. sdlab samples the
    "scaled linear" schedule of 1000 timesteps that every SD release was trained on, and reads
    its ends; keys a config leaves out keep the released values (diffusers' per-class defaults,
    a plain "linear" 0.0001 to 0.02, describe no SD model)."""
    name = sched.get("_class_name", "")
    if name.startswith("EDM") or sched.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise SdlabError(f"{where}: {name} with prediction_type {sched.get('prediction_type')!r} is not a "
                         "discrete eps or v schedule; this version cannot sample such a model")
    if sched.get("trained_betas") is not None or sched.get("beta_schedule", "scaled_linear") != "scaled_linear" \
            or sched.get("num_train_timesteps", 1000) != 1000:
        raise SdlabError(f"{where}: beta_schedule {sched.get('beta_schedule')!r} over "
                         f"{sched.get('num_train_timesteps')} timesteps is not supported; this version samples "
                         "the scaled_linear schedule of 1000 timesteps that Stable Diffusion models use")
    return replace(family, zero_terminal_snr=family.zero_terminal_snr or bool(sched.get("rescale_betas_zero_snr")),
                   beta_start=float(sched.get("beta_start", family.beta_start)),
                   beta_end=float(sched.get("beta_end", family.beta_end)))


# ---------------------------------------------------------------- writing


def _unet_json(cfg: UNetConfig, sample_size: int) -> dict:
    bo = [cfg.model_channels * m for m in cfg.channel_mult]
    heads = cfg.num_heads if cfg.num_heads else [c // cfg.num_head_channels for c in bo]
    d = {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "block_out_channels": bo,
        # One number when uniform, as released configs have it (from_single_file needs that).
        "layers_per_block": cfg.num_res_blocks[0] if len(set(cfg.num_res_blocks)) == 1 else list(cfg.num_res_blocks),
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if cfg.transformer_depth_middle else "UNetMidBlock2D",
        "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.use_linear_in_transformer,
        # Levels without attention take the middle depth: diffusers reads the middle block's
        # depth from the last entry.
        "transformer_layers_per_block": [d or (cfg.transformer_depth_middle or 1) for d in cfg.transformer_depth],
        "norm_num_groups": cfg.norm_groups, "flip_sin_to_cos": True, "freq_shift": 0,
    }
    if cfg.transformer_depth_middle and cfg.transformer_depth[-1] not in (0, cfg.transformer_depth_middle):
        raise SdlabError("this UNet's middle-block depth has no diffusers equivalent")
    if cfg.adm_in_channels:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=cfg.size_embed_dim,
                 projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return d


def _vae_json(cfg: VAEConfig, sample_size: int, scale: float) -> dict:
    levels = len(cfg.channel_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "latent_channels": cfg.latent_channels,
            "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": cfg.num_res_blocks, "norm_num_groups": cfg.norm_groups,
            "sample_size": sample_size, "scaling_factor": scale, "act_fn": "silu"}


def _clip_json(cfg: CLIPTextConfig, layers: int, pad_token_id: int, with_projection: bool = False) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.width,
            "intermediate_size": cfg.mlp_width, "num_hidden_layers": layers, "num_attention_heads": cfg.heads,
            "max_position_embeddings": cfg.max_positions, "hidden_act": cfg.activation, "layer_norm_eps": 1e-5,
            "projection_dim": cfg.projection_dim or cfg.width, "bos_token_id": 49406,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": pad_token_id, "torch_dtype": "float32"}


def write_diffusers_folder(sd: dict[str, Tensor], cfg: ModelConfig, out: Path, tokenizer_dir: Path | None = None,
                           replace_existing: bool = False) -> None:
    """Write a native state dict as a diffusers folder (safetensors weights, configs,
    tokenizer files). Written to a temporary sibling folder, then renamed into place;
    `replace_existing`: an existing folder is swapped out only once the new one is complete."""
    family = cfg.family

    def fill(tmp: Path) -> None:
        sample = family.default_size // cfg.vae.downsample_factor
        part = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa: E731
        (tmp / "unet").mkdir(parents=True)
        save_safetensors(dk.unet_to_diffusers(part(UNET_PREFIX), cfg.unet), tmp / "unet" / "diffusion_pytorch_model.safetensors")
        (tmp / "unet" / "config.json").write_text(json.dumps(_unet_json(cfg.unet, sample), indent=2))
        (tmp / "vae").mkdir()
        save_safetensors(dk.vae_to_diffusers(part(VAE_PREFIX), cfg.vae), tmp / "vae" / "diffusion_pytorch_model.safetensors")
        (tmp / "vae" / "config.json").write_text(json.dumps(_vae_json(cfg.vae, family.default_size, family.latent_scale), indent=2))
        sd2 = family.name.startswith("sd2")
        for slot, te_cfg in zip(family.text_encoders, cfg.text_encoders):
            te = dk.clip_to_diffusers(part(slot.prefix), te_cfg, drop_last_layer=sd2)
            with_projection = "text_projection.weight" in te and not sd2
            if not with_projection:
                te.pop("text_projection.weight", None)  # CLIPTextModel has no projection
            (tmp / slot.diffusers_folder).mkdir()
            save_safetensors(te, tmp / slot.diffusers_folder / "model.safetensors")
            (tmp / slot.diffusers_folder / "config.json").write_text(json.dumps(
                _clip_json(te_cfg, te_cfg.layers - int(sd2), 0 if slot.pad_token == "zero" else 49407,
                           with_projection), indent=2))
            _write_tokenizer(tmp / slot.tokenizer_folder, slot.pad_token, tokenizer_dir)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "EulerDiscreteScheduler", "beta_start": family.beta_start, "beta_end": family.beta_end,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
            "prediction_type": "v_prediction" if family.prediction == "v" else "epsilon",
            "rescale_betas_zero_snr": family.zero_terminal_snr,
            "timestep_spacing": "leading", "interpolation_type": "linear"}, indent=2))
        index = {
            "_class_name": family.diffusers_pipeline,
            "_diffusers_version": "0.30.0", "feature_extractor": [None, None], "image_encoder": [None, None],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": [None, None], "tokenizer": [None, None],
        }
        for slot in family.text_encoders:
            cls = "CLIPTextModelWithProjection" if slot.diffusers_folder == "text_encoder_2" else "CLIPTextModel"
            index[slot.diffusers_folder] = ["transformers", cls]
            index[slot.tokenizer_folder] = ["transformers", "CLIPTokenizer"]
        if family.added_conditioning:
            # sdlab (like the web UIs) encodes an empty negative prompt rather than using zeros.
            index["force_zeros_for_empty_prompt"] = False
            if family.added_conditioning == "sdxl-refiner":
                index["requires_aesthetics_score"] = True
        else:
            index.update(safety_checker=[None, None], requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

    write_folder_atomically(out, fill, replace_existing)


def write_folder_atomically(out: Path, fill: Callable[[Path], None], replace_existing: bool = False) -> None:
    """`fill(tmp)` writes a folder into a temporary sibling, which is then renamed into place;
    `replace_existing`: an existing folder is swapped out only once the new one is complete."""
    if out.exists() and not replace_existing:
        raise SdlabError(f"{out}: already exists; choose a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tokenizer(folder: Path, pad_token: str, source: Path | None) -> None:
    from ..text.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.from_files(source / "vocab.json", source / "merges.txt", pad_token=pad_token) \
        if source else CLIPTokenizer(pad_token=pad_token)
    tok.save(folder)

