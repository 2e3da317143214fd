"""Files a graph loads on its own, beside a checkpoint: a VAE (VAELoader), SD3's text encoders
(TripleCLIPLoader), control models and upscalers (listed here; loaded by `controlnet` and
`upscalers`). Each list is what a node's combo offers: file names relative to their folder, as
ComfyUI lists them; a name is only ever looked up in its listing, so nothing outside the models
folder is reachable.

ComfyUI's folder names and the web UI's are both read (`models_dir`, `controlnet.units`,
`upscalers.FOLDERS`; SD3's encoders in `text_encoders/` or `clip/`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ...errors import SdlabError
from ...families import FAMILIES, Family
from ...models.vae import PRESETS, AutoencoderKL, config_from_state_dict
from .values import NodeError

__all__ = ["files_in", "load_sd3_text_encoders", "load_vae_file"]

ENCODER_FOLDERS = ("text_encoders", "clip")
ENCODER_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


def files_in(folders: list[Path], suffixes: tuple[str, ...], folder_models: bool = False) -> dict[str, Path]:
    """name -> path of the files under each folder (the first folder wins a name), names relative
    to their folder with "/" separators; hidden files and links leading outside left out.
    `folder_models`: a folder holding config.json (a diffusers model) is listed as one name."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        base = folder.resolve()
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts) or not path.resolve().is_relative_to(base):
                continue
            if path.is_file() and path.suffix.lower() in suffixes and not (
                    folder_models and (path.parent / "config.json").is_file() and path.parent != folder):
                found.setdefault(rel.as_posix(), path)
            elif folder_models and path.is_dir() and (path / "config.json").is_file():
                found.setdefault(rel.as_posix(), path)
    return found


def _default_vae_dtype(device: torch.device) -> torch.dtype:
    # fp32 on the CPU, as the pipeline runs VAEs there; on a GPU what its VAEs run in without the
    # fp16 overflow of SDXL's (this file's family is not known).
    from ...device import vae_dtype

    return torch.float32 if device.type == "cpu" else vae_dtype(device, torch.float16, "sdxl")


def load_vae_file(path: Path, device: torch.device) -> tuple[AutoencoderKL, Family]:
    """A VAE file (released or diffusers layout, with or without `first_stage_model.`) as a
    network, and its raw latent space (scale 1, shift 0).

    Raises:
        SdlabError: not a VAE, or a damaged one.
    """
    from ...checkpoints.io import read_state_dict
    from ...models_dir import read_vae

    shapes = read_state_dict(path).shapes
    conv_in = next((s for k, s in shapes.items() if k.endswith("decoder.conv_in.weight")), None)
    if conv_in is None:
        raise NodeError(f"{path.name}: not a VAE (no decoder.conv_in.weight)")
    preset = PRESETS["sd3" if conv_in[1] == 16 else "sd"]  # how diffusers-keyed files are read
    tensors = read_vae(path, preset)
    cfg = config_from_state_dict({k: tuple(v.shape) for k, v in tensors.items()})
    with torch.device("meta"):
        net = AutoencoderKL(cfg)
    try:
        net.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise NodeError(f"{path.name}: not a VAE this version reads ({str(e).splitlines()[0][:160]})") from None
    net = net.to(device=device, dtype=_default_vae_dtype(device)).eval().requires_grad_(False)
    net.to(memory_format=torch.channels_last)  # as `perf.prepare_for_inference` runs a checkpoint's VAE
    like = FAMILIES["sd3" if cfg.latent_channels == 16 else "sd1"]
    return net, replace(like, name="raw-vae", latent_scale=1.0, latent_shift=0.0)


def load_sd3_text_encoders(paths: list[Path], device: torch.device, dtype: torch.dtype) -> tuple[list, Family]:
    """SD3's text encoders from separate files in any order (TripleCLIPLoader): T5 is told apart
    by its keys (`encoder.block.*`) and the two CLIPs by width (CLIP-L is the narrower); the
    text-encoder runners in SD3's slot order, and the family with the slots present.

    Raises:
        SdlabError: a file that is no text encoder, or not two CLIPs (T5 is optional, as for a
            checkpoint without it).
    """
    from types import SimpleNamespace

    from ...checkpoints import sd3
    from ...checkpoints.building import take
    from ...checkpoints.io import StateDict, read_state_dict
    from ...families import clip_config_from_shapes
    from ...models.t5 import config_from_state_dict as t5_config
    from ...pipeline import text_runners

    named: dict[str, Path] = {}
    clips: list[tuple[int, Path]] = []
    for path in paths:
        keys = read_state_dict(path).shapes
        if any(".block.0.layer.0.SelfAttention.q.weight" in k for k in keys):
            if "t5xxl" in named:
                raise NodeError("two T5 encoders given; TripleCLIPLoader takes CLIP-L, CLIP-G and T5-XXL")
            named["t5xxl"] = path
            continue
        width = next((s[1] for k, s in keys.items() if k.endswith("embeddings.token_embedding.weight")), None)
        if width is None:
            raise NodeError(f"{path.name}: not a CLIP or T5 text encoder")
        clips.append((width, path))
    if len(clips) != 2:
        raise NodeError(f"SD3 needs CLIP-L and CLIP-G; {len(clips)} CLIP file(s) given")
    clips.sort(key=lambda c: c[0])
    named["clip_l"], named["clip_g"] = clips[0][1], clips[1][1]
    # The files' tensors under SD3's slot prefixes, as a checkpoint would hold them.
    sd = sd3.with_encoder_files(StateDict(paths[0], {}, {}, lambda k, d: None, {}), named)
    slots = tuple(s for s in FAMILIES["sd3"].text_encoders if any(k.startswith(s.prefix) for k in sd.shapes))
    family = replace(FAMILIES["sd3"], text_encoders=slots)
    encoders, tokenizers, configs = [], [], []
    for slot in slots:
        part = {k[len(slot.prefix):]: v for k, v in sd.shapes.items() if k.startswith(slot.prefix)}
        if slot.layout == "t5":
            cfg = t5_config(part)
        else:
            cfg = clip_config_from_shapes(part, slot.layout)
            cfg = replace(cfg, activation=slot.activation or cfg.activation)
        try:
            net = sd3.build_text_encoder(cfg, take(sd, slot.prefix), dtype, named[slot.prefix.split(".")[1]], None)
        except SdlabError as e:
            raise NodeError(str(e)) from None
        encoders.append(net.to(device).eval().requires_grad_(False))
        tokenizers.append(sd3.tokenizer_for(paths[0], slot, 77))
        configs.append(cfg)
    # The runners a checkpoint's encoders get (`text_runners` reads a bundle's family, its config's
    # family and encoder configs, the encoders and tokenizers; no denoiser: both CLIPs are here).
    holder = SimpleNamespace(family=family, config=SimpleNamespace(family=family, text_encoders=tuple(configs)),
                             text_encoders=encoders, tokenizers=tokenizers)
    return text_runners(holder), family
