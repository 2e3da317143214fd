"""Diffusers folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...):
read into the native single-file layout, and written from it so that diffusers'
`from_pretrained` loads the result."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from ..errors import SdlabError
from ..families import FAMILIES, UNET_PREFIX, VAE_PREFIX, Family, ModelConfig
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


def _read_weights(folder: Path) -> dict[str, Tensor]:
    """The weights of one diffusers sub-folder: safetensors preferred, sharded or not."""
    for stem in _WEIGHT_NAMES:
        for suffix in (".safetensors", ".bin"):
            index = folder / f"{stem}{suffix}.index.json"
            if index.exists():
                shards = sorted(set(_read_json(index)["weight_map"].values()))
                out: dict[str, Tensor] = {}
                for shard in shards:
                    out.update(read_state_dict(folder / shard))
                return out
            single = folder / f"{stem}{suffix}"
            if single.exists():
                return dict(read_state_dict(single))
    raise SdlabError(f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors or model.safetensors)")


def _unet_config(d: dict) -> UNetConfig:
    bo = list(d["block_out_channels"])
    levels = len(bo)
    per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * levels  # noqa: E731
    depth_per_level = per_level(d.get("transformer_layers_per_block", 1))
    has_attn = ["CrossAttn" in t for t in d["down_block_types"]]
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        head_channels = {c // h for c, h in zip(bo, heads)}
        if len(head_channels) != 1:
            raise SdlabError(f"unsupported UNet config: attention heads {heads} for channels {bo}")
        num_heads, num_head_channels = None, head_channels.pop()
    else:
        num_heads, num_head_channels = int(heads), None
    adm = d.get("projection_class_embeddings_input_dim") if d.get("addition_embed_type") == "text_time" else None
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
        model_channels=bo[0], channel_mult=tuple(c // bo[0] for c in bo),
        num_res_blocks=per_level(d.get("layers_per_block", 2)),
        transformer_depth=tuple(depth if attn else 0 for depth, attn in zip(depth_per_level, has_attn)),
        transformer_depth_middle=0 if d.get("mid_block_type") == "UNetMidBlock2D" else depth_per_level[-1],
        num_heads=num_heads, num_head_channels=num_head_channels,
        context_dim=d.get("cross_attention_dim", 768), use_linear_in_transformer=d.get("use_linear_projection", False),
        adm_in_channels=adm, norm_groups=d.get("norm_num_groups", 32),
    )


def _vae_config(d: dict) -> VAEConfig:
    bo = list(d["block_out_channels"])
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                     latent_channels=d.get("latent_channels", 4), base_channels=bo[0],
                     channel_mult=tuple(c // bo[0] for c in bo), num_res_blocks=d.get("layers_per_block", 2),
                     norm_groups=d.get("norm_num_groups", 32))


def _clip_config(d: dict, layout: str, extra_layer: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        layout=layout, vocab_size=d["vocab_size"], width=d["hidden_size"],
        layers=d["num_hidden_layers"] + int(extra_layer), heads=d["num_attention_heads"],
        mlp_width=d["intermediate_size"], max_positions=d.get("max_position_embeddings", 77),
        activation=d.get("hidden_act", "quick_gelu"),
        projection_dim=(d.get("projection_dim") or d["hidden_size"]) if layout == "openclip" else None,
        eos_token_id=d.get("eos_token_id", 49407) if d.get("eos_token_id", 2) != 2 else 49407,
    )


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
    unet_cfg = _unet_config(_read_json(path / "unet" / "config.json"))
    vae_json = _read_json(path / "vae" / "config.json")
    vae_cfg = _vae_config(vae_json)
    sched = {}
    if (path / "scheduler" / "scheduler_config.json").exists():
        sched = _read_json(path / "scheduler" / "scheduler_config.json")
    te_json = _read_json(path / "text_encoder" / "config.json") if _present(index, "text_encoder") else None
    family = _family_of_folder(index, unet_cfg, te_json, sched.get("prediction_type", "epsilon"))
    if sched.get("rescale_betas_zero_snr"):
        family = replace(family, zero_terminal_snr=True)
    if vae_json.get("scaling_factor") is not None and abs(vae_json["scaling_factor"] - family.latent_scale) > 1e-6:
        family = replace(family, latent_scale=float(vae_json["scaling_factor"]))

    tensors: dict[str, Tensor] = {}
    for k, v in dk.unet_from_diffusers(_read_weights(path / "unet"), unet_cfg).items():
        tensors[UNET_PREFIX + k] = v
    for k, v in dk.vae_from_diffusers(_read_weights(path / "vae"), vae_cfg).items():
        tensors[VAE_PREFIX + k] = v
    te_cfgs = []
    # Only SD 2.x folders drop OpenCLIP's last layer (their pipelines read the last hidden
    # state); SDXL folders keep every layer and read the penultimate one.
    sd2 = family.name.startswith("sd2")
    for slot in family.text_encoders:
        folder = path / slot.diffusers_folder
        te_cfgs.append(_clip_config(_read_json(folder / "config.json"), slot.layout, extra_layer=sd2))
        for k, v in dk.clip_from_diffusers(_read_weights(folder), slot.layout, append_identity_layer=sd2).items():
            tensors[slot.prefix + k] = v
    cfg = ModelConfig(family, unet_cfg, vae_cfg, tuple(te_cfgs))
    return StateDict.from_tensors(tensors, path, {"sdlab.config": cfg.to_json()}), cfg


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
        d.update(addition_embed_type="text_time", addition_time_embed_dim=256,
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
    if out.exists() and not replace_existing:
        raise SdlabError(f"{out}: already exists; choose a new folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
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
            "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
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

