"""ComfyUI's core nodes (its `nodes.py`) over sdlab's generation steps.

Each node is a class with ComfyUI's schema (`inputs(env)` is its INPUT_TYPES, then RETURN_TYPES,
RETURN_NAMES, CATEGORY, OUTPUT_NODE) and a `run(rt, **inputs)` that calls one step or two
(`sdlab.steps`, `text.conditioning`, `sampling.noise.BatchNoise`). The values on the links are
thin wrappers over sdlab's own (`values`). `nodes_sd3`, `nodes_control` and `nodes_upscale` hold
the nodes of ComfyUI's extras files of the same names; `registry` lists them all.

A node never changes the loaded weights for anyone else: a graph's LoRAs are merged into the
worker's model only while its nodes run (`use_loras`), and taken out when the graph ends.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ... import steps
from ...families import Family
from ...lora import LoraSpec
from ...model import SizeConditioning, model_for
from ...sampling.noise import BatchNoise, NoiseSource
from ...sampling.patches import inpaint_mask
from ...sampling.samplers import SAMPLERS, SamplerInfo
from ...sampling.schedules import SCHEDULES
from ...text.conditioning import EncodedPrompt, encode_all
from ...text.prompt import pad_chunks
from .guidance import guided
from .scaling import scale_bchw as _scale_bchw
from .values import ClipRef, Cond, ControlRef, ModelRef, NodeError, VaeRef, in_space

if TYPE_CHECKING:
    from ...models.controlnet import ControlNet
    from ...models.vae import AutoencoderKL
    from ...pipeline import Pipeline

__all__ = ["CORE_NODES", "ClipRef", "Cond", "ModelRef", "Node", "NodeError", "VaeRef", "node_info"]

MAX_RESOLUTION = 16384
MAX_SEED = 0xFFFFFFFFFFFFFFFF

# ComfyUI's sampler names -> ours. ComfyUI's "ddim" is Euler on the ddim_uniform-style sigmas it
# is given (comfy/samplers.py), so it maps to Euler.
SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "lcm": "LCM", "ddim": "Euler",
    "uni_pc": "UniPC",
}
# ComfyUI takes one more sigma and drops the next-to-last for these (DISCARD_PENULTIMATE_SIGMA_SAMPLERS).
DISCARD_PENULTIMATE = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
# ComfyUI's scheduler names, in its order, that sdlab has (`sampling.schedules.SCHEDULES`).
SCHEDULER_NAMES = [n for n in ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal")
                   if n in SCHEDULES]
LATENT_UPSCALE = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
IMAGE_UPSCALE = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# Helpers over the worker's model

def use_loras(pipe: Pipeline, unet: tuple = (), te: tuple = ()) -> None:
    """Make exactly these LoRAs be merged into the loaded model (the pipeline's own LoraState,
    so the web UI's next request restores the weights it wants, bit for bit)."""
    specs = [LoraSpec(name, Path(path), 0.0, float(s)) for name, path, s in unet]
    specs += [LoraSpec(name, Path(path), float(s), 0.0) for name, path, s in te]
    pipe.loras.set(pipe.bundle, specs)
    for runner in pipe.text:
        runner.weights_version = pipe.loras.te_version


_EMBEDDING = re.compile(r"embedding:([^\s,()\[\]]+)", re.IGNORECASE)


def _embedding_syntax(text: str) -> str:
    """ComfyUI names an embedding `embedding:name[.pt]`; the prompt parser knows it by its name."""
    def name(m: re.Match) -> str:
        stem = m.group(1)
        for suffix in (".safetensors", ".pt", ".bin"):
            if stem.lower().endswith(suffix):
                return stem[: -len(suffix)]
        return stem
    return _EMBEDDING.sub(name, text)


def clip_family(rt, clip: ClipRef) -> Family:
    """The family whose text encoders a CLIP value holds (its slots, in order)."""
    return clip.family if clip.entry is None else rt.pipeline(clip.entry).bundle.family


def encode_text(rt, clip: ClipRef, texts: Sequence[str], use: Sequence[int] | None = None) -> EncodedPrompt:
    """One text per text encoder (in the family's slot order), encoded (web UI prompt weighting)
    and combined by the family's rule, with CLIPSetLastLayer's layer and the graph's LoRAs.
    `use`: only these encoders (CLIPTextEncodeSD3's empty texts leave theirs out)."""
    if clip.entry is None:  # encoders loaded from files (TripleCLIPLoader)
        runners, family, library = list(clip.runners), clip.family, rt.env.embedding_library()
    else:
        pipe = rt.pipeline(clip.entry)
        use_loras(pipe, te=clip.loras)
        runners, family, library = pipe.text, pipe.bundle.family, pipe.embeddings
    # ComfyUI's stop_at_clip_layer counts from the last layer; the family's own default layer
    # (SDXL: the penultimate) is layer -family.clip_skip.
    clip_skip = max(1, -clip.stop_at - family.clip_skip + 1)
    slots = list(family.text_encoders)
    if use is not None:
        runners, slots, texts = [runners[i] for i in use], [slots[i] for i in use], [texts[i] for i in use]
    library.refresh()
    texts = [_embedding_syntax(t) for t in texts]
    embeddings, chunked = [], []
    for runner, slot, text in zip(runners, slots, texts, strict=True):
        width = runner.encoder.cfg.width
        library.check_prompt(text, runner.tokenizer, width, slot.embedding_key)
        emb = library.tensors(width, slot.embedding_key)
        embeddings.append(emb)
        chunked.append(runner.chunks(text, emb))
    # The CLIP encoders' states are joined per token: as many chunks each (T5's tokens follow them).
    clips = [i for i, slot in enumerate(slots) if slot.layout != "t5"]
    if len(clips) > 1:
        padded = pad_chunks(*(chunked[i] for i in clips), pad_id=runners[clips[0]].tokenizer.eos_id)
        for i, chunks in zip(clips, padded):
            chunked[i] = chunks
    combine = family.text_combine if len(runners) > 1 else "concat"  # one encoder left: its own output
    return encode_all(runners, chunked, clip_skip, embeddings, combine=combine)


def image_to_pixels(image: Tensor, device, dtype) -> Tensor:
    """IMAGE (B, H, W, 3) in [0, 1] -> (B, 3, H, W) in [-1, 1], what `steps.encode_image` takes."""
    return (image[..., :3].permute(0, 3, 1, 2) * 2.0 - 1.0).to(device=device, dtype=dtype)


def pixels_to_image(pixels: Tensor) -> Tensor:
    return ((pixels.float() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def to_pil_images(image: Tensor) -> list[Image.Image]:
    """ComfyUI's conversion (SaveImage): 255 * x clipped and truncated to uint8."""
    arr = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _sizes(opts: dict, latent: Tensor, negative: bool) -> SizeConditioning:
    # ComfyUI's defaults: the latent's size in pixels (comfy/samplers.py encode_model_conds).
    h, w = latent.shape[-2] * 8, latent.shape[-1] * 8
    height, width = int(opts.get("height", h)), int(opts.get("width", w))
    target = (int(opts.get("target_height", height)), int(opts.get("target_width", width)))
    score = float(opts.get("aesthetic_score", 2.5 if negative else 6.0))
    return SizeConditioning((height, width), (int(opts.get("crop_h", 0)), int(opts.get("crop_w", 0))), target,
                            score, score)


def comfy_sigmas(sampling, scheduler: str, sampler_name: str, steps: int) -> Tensor:
    if sampler_name in DISCARD_PENULTIMATE:
        sigmas = SCHEDULES[scheduler].function(steps + 1, sampling)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return SCHEDULES[scheduler].function(steps, sampling)


def _control_nets(pipe: Pipeline, model: ModelRef, conds: Cond) -> dict[ControlRef, ControlNet]:
    """The ControlNets the conditionings apply, loaded for the sampling model (the pipeline keeps
    them between prompts). Diff ControlNets and Control-LoRAs are made from the model's own
    weights, so the graph's LoRAs are out of the UNet while they load, as ComfyUI makes them
    from the model's state dict."""
    refs = {spec.control for _, opts in conds for spec in opts.get("control") or ()}
    if not refs:
        return {}
    if pipe.bundle.family.is_flow:
        raise NodeError(f"ControlNets apply to UNet models (SD 1.x, 2.x, SDXL); {pipe.bundle.name} is "
                        f"{pipe.bundle.family.label}")
    use_loras(pipe)
    out = {}
    for ref in refs:
        if ref.base is not None and ref.base.entry.path != model.entry.path:
            raise NodeError(f"DiffControlNetLoader's model is {ref.base.entry.name} but {model.entry.name} samples; "
                            "give the diff ControlNet the model that samples")
        out[ref] = pipe.controlnets.get(str(ref.path), pipe.bundle)
    return out


def common_ksampler(rt, model: ModelRef, seed: int, steps_: int, cfg: float, sampler_name: str, scheduler: str,
                    positive: Cond, negative: Cond, latent: dict, denoise: float = 1.0, disable_noise: bool = False,
                    start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> tuple[dict]:
    """nodes.py common_ksampler and comfy/samplers.py KSampler.sample, over sdlab's steps."""
    pipe = rt.pipeline(model.entry)
    bundle = pipe.bundle
    family = bundle.family
    if model.shift is not None and not family.is_flow:
        raise NodeError(f"ModelSamplingSD3 sets the shift of flow models (SD3, SD3.5); {bundle.name} is "
                        f"{family.label}, sampled on its discrete schedule")
    nets = _control_nets(pipe, model, positive + negative)
    use_loras(pipe, unet=model.loras)
    adapter = model_for(bundle, shift=model.shift)
    sampling = adapter.sampling
    samples = in_space(latent, family).float()
    channels = bundle.config.vae.latent_channels
    if samples.shape[1] != channels and not bool(samples.any()):
        # An empty latent takes the model's channel count (comfy.sample.fix_empty_latent_channels).
        samples = torch.zeros((samples.shape[0], channels, *samples.shape[2:]))
    if samples.shape[1] != channels:
        raise NodeError(f"the latent has {samples.shape[1]} channels; this model's have {channels}")
    # ComfyUI's noise: one CPU generator for the whole batch (comfy.sample.prepare_noise).
    noise_source = BatchNoise(tuple(samples.shape), seed)
    noise = torch.zeros_like(samples) if disable_noise else noise_source.initial()

    if denoise <= 0.0:
        return ({**latent, "samples": samples, "space": family},)
    if denoise > 0.9999:
        sigmas = comfy_sigmas(sampling, scheduler, sampler_name, steps_)
    else:
        sigmas = comfy_sigmas(sampling, scheduler, sampler_name, int(steps_ / denoise))[-(steps_ + 1):]
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1]
        if force_full_denoise:
            sigmas = sigmas.clone()
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return ({**latent, "samples": samples, "space": family},)
        sigmas = sigmas[start_step:]

    device = bundle.device
    x_latent = samples.to(device)
    mask = latent.get("noise_mask")
    small_mask = None
    if mask is not None:
        small_mask = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=samples.shape[-2:],
                                   mode="bilinear").to(device)
        small_mask = small_mask.expand(samples.shape[0], -1, -1, -1) if small_mask.shape[0] == 1 else small_mask
    concat = None
    if bundle.config.unet.in_channels == channels + channels + 1:  # an inpainting model
        opts = positive[0][1] if positive else {}
        given = opts.get("concat_latent_image")
        concat_latent = (samples if given is None else
                         in_space({"samples": given, "space": opts.get("concat_space")}, family)).to(device)
        concat_mask = opts.get("concat_mask", mask)
        m = (torch.ones_like(samples[:, :1]) if concat_mask is None else
             F.interpolate(concat_mask.reshape(-1, 1, *concat_mask.shape[-2:]).float(),
                           size=samples.shape[-2:], mode="bilinear"))
        concat = torch.cat([m.to(device).expand(samples.shape[0], -1, -1, -1),
                            concat_latent.expand(samples.shape[0], -1, -1, -1)], dim=1)
    batch = x_latent.shape[0]

    def conditioning(encoded: EncodedPrompt, opts: dict, negative_side: bool):
        return adapter.conditioning(encoded, batch, _sizes(opts, x_latent, negative_side), negative_side, concat)

    denoiser = guided(adapter, positive, negative, cfg, x_latent, conditioning, lambda spec: nets[spec.control],
                      bundle.config.vae.downsample_factor)
    if small_mask is not None:
        denoiser = inpaint_mask(denoiser, x_latent, small_mask)

    sigma0 = float(sigmas[0])
    # ComfyUI's EPS.noise_scaling: at full denoise the noise is scaled by sqrt(1 + sigma^2).
    max_denoise = math.isclose(sampling.sigma_max, sigma0, rel_tol=1e-5) or sigma0 > sampling.sigma_max
    noise = noise.to(device)
    if max_denoise and sampling.prediction != "flow":
        x = x_latent + noise * math.sqrt(1.0 + sigma0**2)
    else:
        x = steps.noised(sampling, sigmas[:1], noise, x_latent)
    info: SamplerInfo = SAMPLERS[SAMPLER_NAMES[sampler_name]]
    noise_sampler = noise_source.sampler_noise(x, sigmas, info.brownian_noise)
    total = len(sigmas) - 1

    def callback(i: int, n: int, x_t: Tensor, denoised: Tensor) -> None:
        rt.progress(i + 1, total, denoised, family)

    out = steps.sample(sampling, denoiser, x, sigmas.to(device), info, noise_sampler, callback=callback)
    if small_mask is not None:
        out = x_latent * (1 - small_mask) + out * small_mask
    result = {k: v for k, v in latent.items() if k != "samples"}
    result["samples"] = out.float().cpu()
    result["space"] = family
    return (result,)


# ---------------------------------------------------------------------------------------------
# Node classes

class Node:
    CATEGORY = ""
    DISPLAY_NAME: str | None = None
    DESCRIPTION = ""
    RETURN_TYPES: tuple[str, ...] = ()
    RETURN_NAMES: tuple[str, ...] | None = None
    OUTPUT_NODE = False
    DEPRECATED = False
    PYTHON_MODULE = "nodes"
    # Inputs whose value is checked by `validate` instead of min/max/combo (ComfyUI's VALIDATE_INPUTS).
    CUSTOM_VALIDATED: tuple[str, ...] = ()

    @classmethod
    def inputs(cls, env) -> dict:
        return {"required": {}}

    @classmethod
    def validate(cls, env, **values) -> bool | str:
        return True

    @classmethod
    def is_changed(cls, env, **values) -> Any:
        """ComfyUI's IS_CHANGED: part of the cache key; False for most nodes."""
        return False

    def run(self, rt, **kw):
        raise NotImplementedError


def INT(default: int, lo: int, hi: int, step: int = 1, **extra) -> list:
    return ["INT", {"default": default, "min": lo, "max": hi, "step": step, **extra}]


def FLOAT(default: float, lo: float, hi: float, step: float, **extra) -> list:
    return ["FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **extra}]


TEXT = ["STRING", {"multiline": True, "dynamicPrompts": True}]


class CheckpointLoaderSimple(Node):
    CATEGORY, DISPLAY_NAME = "loaders", "Load Checkpoint"
    DESCRIPTION = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")

    @classmethod
    def inputs(cls, env):
        return {"required": {"ckpt_name": [env.checkpoint_names(), {"tooltip": "The name of the checkpoint (model) to load."}]}}

    def run(self, rt, ckpt_name):
        entry = rt.env.find_checkpoint(ckpt_name)
        return ModelRef(entry), ClipRef(entry), VaeRef(entry)


class CLIPTextEncode(Node):
    CATEGORY, DISPLAY_NAME = "conditioning", "CLIP Text Encode (Prompt)"
    DESCRIPTION = "Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion model towards generating specific images."
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"text": TEXT, "clip": ["CLIP"]}}

    def run(self, rt, text, clip):
        return ([(encode_text(rt, clip, [text] * len(clip_family(rt, clip).text_encoders)), {})],)


class CLIPTextEncodeSDXL(Node):
    CATEGORY, PYTHON_MODULE = "advanced/conditioning", "comfy_extras.nodes_clip_sdxl"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"clip": ["CLIP"], "width": INT(1024, 0, MAX_RESOLUTION), "height": INT(1024, 0, MAX_RESOLUTION),
                             "crop_w": INT(0, 0, MAX_RESOLUTION), "crop_h": INT(0, 0, MAX_RESOLUTION),
                             "target_width": INT(1024, 0, MAX_RESOLUTION), "target_height": INT(1024, 0, MAX_RESOLUTION),
                             "text_g": TEXT, "text_l": TEXT}}

    def run(self, rt, clip, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l):
        slots = [s.embedding_key for s in clip_family(rt, clip).text_encoders]
        texts = [text_g if key == "clip_g" else text_l for key in slots]
        opts = {"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
                "target_width": target_width, "target_height": target_height}
        return ([(encode_text(rt, clip, texts), opts)],)


class CLIPTextEncodeSDXLRefiner(Node):
    CATEGORY, PYTHON_MODULE = "advanced/conditioning", "comfy_extras.nodes_clip_sdxl"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"ascore": FLOAT(6.0, 0.0, 1000.0, 0.01), "width": INT(1024, 0, MAX_RESOLUTION),
                             "height": INT(1024, 0, MAX_RESOLUTION), "text": TEXT, "clip": ["CLIP"]}}

    def run(self, rt, ascore, width, height, text, clip):
        return ([(encode_text(rt, clip, [text] * len(clip_family(rt, clip).text_encoders)),
                  {"aesthetic_score": ascore, "width": width, "height": height})],)


class CLIPSetLastLayer(Node):
    CATEGORY, DISPLAY_NAME = "conditioning", "CLIP Set Last Layer"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"clip": ["CLIP"], "stop_at_clip_layer": INT(-1, -24, -1)}}

    def run(self, rt, clip, stop_at_clip_layer):
        return (replace(clip, stop_at=stop_at_clip_layer),)


class ConditioningCombine(Node):
    CATEGORY, DISPLAY_NAME = "conditioning", "Conditioning (Combine)"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"conditioning_1": ["CONDITIONING"], "conditioning_2": ["CONDITIONING"]}}

    def run(self, rt, conditioning_1, conditioning_2):
        return (conditioning_1 + conditioning_2,)


class ConditioningConcat(Node):
    CATEGORY, DISPLAY_NAME = "conditioning", "Conditioning (Concat)"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"conditioning_to": ["CONDITIONING"], "conditioning_from": ["CONDITIONING"]}}

    def run(self, rt, conditioning_to, conditioning_from):
        source = conditioning_from[0][0].context
        return ([(EncodedPrompt(torch.cat([e.context, source], dim=1), e.pooled), dict(o))
                 for e, o in conditioning_to],)


class ConditioningZeroOut(Node):
    CATEGORY = "advanced/conditioning"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"conditioning": ["CONDITIONING"]}}

    def run(self, rt, conditioning):
        return ([(EncodedPrompt(torch.zeros_like(e.context), torch.zeros_like(e.pooled)), dict(o))
                 for e, o in conditioning],)


class ConditioningSetArea(Node):
    """ComfyUI's area conditioning: the conditioning counts only on its rectangle (in pixels, /8
    to latent pixels as ComfyUI divides), with its strength, blended per pixel with the others of
    its side (`guidance`, `sampling.regional`)."""

    CATEGORY, DISPLAY_NAME = "conditioning", "Conditioning (Set Area)"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"conditioning": ["CONDITIONING"],
                             "width": INT(64, 64, MAX_RESOLUTION, 8), "height": INT(64, 64, MAX_RESOLUTION, 8),
                             "x": INT(0, 0, MAX_RESOLUTION, 8), "y": INT(0, 0, MAX_RESOLUTION, 8),
                             "strength": FLOAT(1.0, 0.0, 10.0, 0.01)}}

    def run(self, rt, conditioning, width, height, x, y, strength):
        opts = {"area": (height // 8, width // 8, y // 8, x // 8), "strength": strength, "set_area_to_bounds": False}
        return ([(e, {**o, **opts}) for e, o in conditioning],)


class EmptyLatentImage(Node):
    CATEGORY, DISPLAY_NAME = "latent", "Empty Latent Image"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"width": INT(512, 16, MAX_RESOLUTION, 8), "height": INT(512, 16, MAX_RESOLUTION, 8),
                             "batch_size": INT(1, 1, 4096)}}

    def run(self, rt, width, height, batch_size):
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8]), "downscale_ratio_spacial": 8},)


class KSampler(Node):
    CATEGORY = "sampling"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {
            "model": ["MODEL"],
            "seed": INT(0, 0, MAX_SEED, control_after_generate=True),
            "steps": INT(20, 1, 10000),
            "cfg": FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01),
            "sampler_name": [list(SAMPLER_NAMES)],
            "scheduler": [SCHEDULER_NAMES],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "denoise": FLOAT(1.0, 0.0, 1.0, 0.01)}}

    def run(self, rt, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
        return common_ksampler(rt, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise=denoise)


class KSamplerAdvanced(Node):
    CATEGORY, DISPLAY_NAME = "sampling", "KSampler (Advanced)"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {
            "model": ["MODEL"], "add_noise": [["enable", "disable"]],
            "noise_seed": INT(0, 0, MAX_SEED, control_after_generate=True),
            "steps": INT(20, 1, 10000), "cfg": FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01),
            "sampler_name": [list(SAMPLER_NAMES)], "scheduler": [SCHEDULER_NAMES],
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "start_at_step": INT(0, 0, 10000), "end_at_step": INT(10000, 0, 10000),
            "return_with_leftover_noise": [["disable", "enable"]]}}

    def run(self, rt, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
            latent_image, start_at_step, end_at_step, return_with_leftover_noise):
        return common_ksampler(rt, model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, disable_noise=add_noise == "disable", start_step=start_at_step,
                               last_step=end_at_step, force_full_denoise=return_with_leftover_noise != "enable")


class VAEDecode(Node):
    CATEGORY, DISPLAY_NAME = "latent", "VAE Decode"
    DESCRIPTION = "Decodes latent images back into pixel space images."
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}

    def run(self, rt, samples, vae):
        net, space = vae_of(rt, vae)
        if vae.entry is None and samples.get("space") is not None:
            space = samples["space"]  # a VAE file decodes a latent from the space it is in, as its raw VAE would
        if samples["samples"].shape[1] != net.cfg.latent_channels:
            raise NodeError(f"the latent has {samples['samples'].shape[1]} channels; this VAE's have "
                            f"{net.cfg.latent_channels}")
        latent = in_space(samples, space).to(next(net.parameters()).device)
        return (pixels_to_image(steps.decode(net, latent, space)),)


class VAEDecodeTiled(VAEDecode):
    CATEGORY, DISPLAY_NAME = "_for_testing", "VAE Decode (Tiled)"

    @classmethod
    def inputs(cls, env):
        return {"required": {"samples": ["LATENT"], "vae": ["VAE"], "tile_size": INT(512, 64, 4096, 32),
                             "overlap": INT(64, 0, 4096, 32), "temporal_size": INT(64, 8, 4096, 4),
                             "temporal_overlap": INT(8, 4, 4096, 4)}}

    def run(self, rt, samples, vae, **_):  # sdlab's decode tiles by itself when the image is large
        return super().run(rt, samples, vae)


def vae_of(rt, vae: VaeRef) -> tuple[AutoencoderKL, Family]:
    """The network of a VAE value and the latent space it encodes into: a checkpoint's VAE, its
    family's; a VAE file's, its raw space."""
    if vae.entry is None:
        return vae.vae, vae.space
    bundle = rt.pipeline(vae.entry).bundle
    return bundle.vae, bundle.family


def _encode(rt, vae: VaeRef, image: Tensor) -> tuple[Tensor, Family]:
    """An IMAGE's latent (the distribution's mean, as ComfyUI's VAE encodes) and its space."""
    net, space = vae_of(rt, vae)
    f = net.cfg.downsample_factor
    h, w = image.shape[1] // f * f, image.shape[2] // f * f
    image = image[:, :h, :w]
    weight = next(net.parameters())
    pixels = image_to_pixels(image, weight.device, weight.dtype)
    # A noise source of zeros gives the mean through the step.
    return steps.encode_image(net, pixels, space, _ZeroNoise()).cpu(), space


class _ZeroNoise(NoiseSource):
    """The latent distribution's mean: ComfyUI's VAE encode is deterministic."""

    def for_encoding(self, shape):
        return torch.zeros(shape)


class VAEEncode(Node):
    CATEGORY, DISPLAY_NAME = "latent", "VAE Encode"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}}

    def run(self, rt, pixels, vae):
        samples, space = _encode(rt, vae, pixels)
        return ({"samples": samples, "space": space},)


class VAELoader(Node):
    """A VAE file of the models folder (the web UI's VAE/ or ComfyUI's vae/); it decodes a latent
    in the space the latent is in, and encodes into its own raw space (`values`)."""

    CATEGORY, DISPLAY_NAME = "loaders", "Load VAE"
    RETURN_TYPES = ("VAE",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"vae_name": [env.vae_names()]}}

    def run(self, rt, vae_name):
        from .loaders import load_vae_file

        net, space = load_vae_file(rt.env.find_vae(vae_name), rt.env.device())
        return (VaeRef(None, net, space, vae_name),)


def _grow(mask: Tensor, by: int) -> Tensor:
    if by <= 0:
        return mask
    kernel = torch.ones((1, 1, 3, 3))
    out = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    for _ in range(by):
        out = torch.clamp(F.conv2d(out, kernel, padding=1), 0, 1)
    return out


class VAEEncodeForInpaint(Node):
    CATEGORY, DISPLAY_NAME = "latent/inpaint", "VAE Encode (for Inpainting)"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"pixels": ["IMAGE"], "vae": ["VAE"], "mask": ["MASK"], "grow_mask_by": INT(6, 0, 64)}}

    def run(self, rt, pixels, vae, mask, grow_mask_by=6):
        h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        mask = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=pixels.shape[1:3], mode="bilinear")
        pixels, mask = pixels[:, :h, :w].clone(), mask[:, :, :h, :w]
        grown = _grow(mask, grow_mask_by)
        keep = (1.0 - mask.round()).squeeze(1)
        pixels[..., :3] = (pixels[..., :3] - 0.5) * keep[..., None] + 0.5  # masked pixels grey, as ComfyUI
        samples, space = _encode(rt, vae, pixels)
        return ({"samples": samples, "space": space, "noise_mask": grown.round()},)


class SetLatentNoiseMask(Node):
    CATEGORY, DISPLAY_NAME = "latent/inpaint", "Set Latent Noise Mask"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"samples": ["LATENT"], "mask": ["MASK"]}}

    def run(self, rt, samples, mask):
        return ({**samples, "noise_mask": mask.reshape(-1, 1, *mask.shape[-2:])},)


class LatentUpscale(Node):
    CATEGORY, DISPLAY_NAME = "latent", "Upscale Latent"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"samples": ["LATENT"], "upscale_method": [LATENT_UPSCALE],
                             "width": INT(512, 0, MAX_RESOLUTION, 8), "height": INT(512, 0, MAX_RESOLUTION, 8),
                             "crop": [["disabled", "center"]]}}

    def run(self, rt, samples, upscale_method, width, height, crop):
        out = _scale_bchw(samples["samples"], upscale_method, width // 8, height // 8, crop)
        return ({**{k: v for k, v in samples.items() if k != "noise_mask"}, "samples": out},)


class LatentUpscaleBy(Node):
    CATEGORY, DISPLAY_NAME = "latent", "Upscale Latent By"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"samples": ["LATENT"], "upscale_method": [LATENT_UPSCALE],
                             "scale_by": FLOAT(1.5, 0.01, 8.0, 0.01)}}

    def run(self, rt, samples, upscale_method, scale_by):
        s = samples["samples"]
        w, h = round(s.shape[-1] * scale_by), round(s.shape[-2] * scale_by)
        return ({**{k: v for k, v in samples.items() if k != "noise_mask"},
                 "samples": _scale_bchw(s, upscale_method, w, h, "disabled")},)


class RepeatLatentBatch(Node):
    CATEGORY, DISPLAY_NAME = "latent/batch", "Repeat Latent Batch"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"samples": ["LATENT"], "amount": INT(1, 1, 64)}}

    def run(self, rt, samples, amount):
        out = dict(samples)
        out["samples"] = samples["samples"].repeat((amount, 1, 1, 1))
        if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
            out["noise_mask"] = samples["noise_mask"].repeat((amount, 1, 1, 1))
        return (out,)


class LatentFromBatch(Node):
    CATEGORY, DISPLAY_NAME = "latent/batch", "Latent From Batch"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"samples": ["LATENT"], "batch_index": INT(0, 0, 63), "length": INT(1, 1, 64)}}

    def run(self, rt, samples, batch_index, length):
        s = samples["samples"]
        start = min(s.shape[0] - 1, batch_index)
        out = dict(samples)
        out["samples"] = s[start:start + min(length, s.shape[0] - start)].clone()
        return (out,)


class ImageScale(Node):
    CATEGORY, DISPLAY_NAME = "image/upscaling", "Upscale Image"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"image": ["IMAGE"], "upscale_method": [IMAGE_UPSCALE],
                             "width": INT(512, 0, MAX_RESOLUTION), "height": INT(512, 0, MAX_RESOLUTION),
                             "crop": [["disabled", "center"]]}}

    def run(self, rt, image, upscale_method, width, height, crop):
        x = _scale_bchw(image.permute(0, 3, 1, 2), upscale_method, width, height, crop)
        return (x.clamp(0, 1).permute(0, 2, 3, 1),)


class ImageScaleBy(Node):
    CATEGORY, DISPLAY_NAME = "image/upscaling", "Upscale Image By"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"image": ["IMAGE"], "upscale_method": [IMAGE_UPSCALE],
                             "scale_by": FLOAT(1.0, 0.01, 8.0, 0.01)}}

    def run(self, rt, image, upscale_method, scale_by):
        w, h = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
        x = _scale_bchw(image.permute(0, 3, 1, 2), upscale_method, w, h, "disabled")
        return (x.clamp(0, 1).permute(0, 2, 3, 1),)


class ImageScaleToTotalPixels(Node):
    CATEGORY, PYTHON_MODULE = "image/upscaling", "comfy_extras.nodes_post_processing"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"image": ["IMAGE"], "upscale_method": [IMAGE_UPSCALE],
                             "megapixels": FLOAT(1.0, 0.01, 16.0, 0.01)},
                "optional": {"resolution_steps": INT(1, 1, 256)}}

    def run(self, rt, image, upscale_method, megapixels, resolution_steps=1):
        h, w = image.shape[1], image.shape[2]
        scale = math.sqrt(megapixels * 1024 * 1024 / (w * h))
        width = max(resolution_steps, round(w * scale / resolution_steps) * resolution_steps)
        height = max(resolution_steps, round(h * scale / resolution_steps) * resolution_steps)
        x = _scale_bchw(image.permute(0, 3, 1, 2), upscale_method, width, height, "disabled")
        return (x.clamp(0, 1).permute(0, 2, 3, 1),)


class InpaintModelConditioning(Node):
    CATEGORY = "conditioning/inpaint"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")

    @classmethod
    def inputs(cls, env):
        return {"required": {"positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "vae": ["VAE"],
                             "pixels": ["IMAGE"], "mask": ["MASK"], "noise_mask": ["BOOLEAN", {"default": True}]}}

    def run(self, rt, positive, negative, vae, pixels, mask, noise_mask=True):
        h, w = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        mask = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=pixels.shape[1:3], mode="bilinear")
        original = pixels[:, :h, :w]
        pixels, mask = original.clone(), mask[:, :, :h, :w]
        keep = (1.0 - mask.round()).squeeze(1)
        pixels[..., :3] = (pixels[..., :3] - 0.5) * keep[..., None] + 0.5
        concat, space = _encode(rt, vae, pixels)
        latent = {"samples": _encode(rt, vae, original)[0], "space": space}
        if noise_mask:
            latent["noise_mask"] = mask
        extra = {"concat_latent_image": concat, "concat_space": space, "concat_mask": mask}
        return ([(e, {**o, **extra}) for e, o in positive], [(e, {**o, **extra}) for e, o in negative], latent)


class ImageInvert(Node):
    CATEGORY, DISPLAY_NAME = "image", "Invert Image"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"image": ["IMAGE"]}}

    def run(self, rt, image):
        return (1.0 - image,)


class SaveImage(Node):
    CATEGORY, DISPLAY_NAME = "image", "Save Image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    OUTPUT_NODE = True
    FOLDER = "output"

    @classmethod
    def inputs(cls, env):
        return {"required": {"images": ["IMAGE", {"tooltip": "The images to save."}],
                             "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."}]},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def run(self, rt, images, filename_prefix="ComfyUI"):
        folder = rt.env.folder(self.FOLDER)
        images = images.cpu()
        prefix = _expand_prefix(filename_prefix, images.shape[2], images.shape[1])
        out_dir, name, counter, subfolder = save_image_path(prefix, folder)
        meta = PngInfo()
        if rt.prompt is not None:
            meta.add_text("prompt", json.dumps(rt.prompt))
        for key, value in (rt.extra_data.get("extra_pnginfo") or {}).items():
            meta.add_text(key, json.dumps(value))
        results = []
        for batch_number, img in enumerate(to_pil_images(images)):
            file = f"{name.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            tmp = out_dir / f".{file}.tmp"
            img.save(tmp, format="PNG", pnginfo=meta, compress_level=self.COMPRESS)
            os.replace(tmp, out_dir / file)
            results.append({"filename": file, "subfolder": subfolder, "type": self.FOLDER})
            counter += 1
        return {"ui": {"images": results}, "result": ()}

    COMPRESS = 4


class PreviewImage(SaveImage):
    CATEGORY, DISPLAY_NAME = "image", "Preview Image"
    DESCRIPTION = "Saves the input images to your ComfyUI temp directory."
    FOLDER = "temp"
    COMPRESS = 1

    @classmethod
    def inputs(cls, env):
        return {"required": {"images": ["IMAGE"]}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def run(self, rt, images):
        suffix = "".join(chr(ord("a") + int(b) % 26) for b in os.urandom(5))
        return super().run(rt, images, f"ComfyUI_temp_{suffix}")


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    import time

    prefix = prefix.replace("%width%", str(width)).replace("%height%", str(height))
    now = time.localtime()
    for token, fmt in (("%year%", "%Y"), ("%month%", "%m"), ("%day%", "%d"), ("%hour%", "%H"),
                       ("%minute%", "%M"), ("%second%", "%S")):
        prefix = prefix.replace(token, time.strftime(fmt, now))
    return prefix


def save_image_path(prefix: str, folder: Path) -> tuple[Path, str, int, str]:
    """folder_paths.get_save_image_path: the folder, the name, the next counter (one more than the
    highest `name_NNNNN_` there) and the subfolder; a prefix leading outside the folder is refused."""
    subfolder, _, name = prefix.replace("\\", "/").rpartition("/")
    base = folder.resolve()
    out_dir = (folder / subfolder).resolve()
    if not out_dir.is_relative_to(base):
        raise NodeError(f"filename_prefix {prefix!r} leads outside the output folder; refused")
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(name) + r"_(\d{5,})_")
    highest = 0
    for f in os.listdir(out_dir):
        m = pattern.match(f)
        if m:
            highest = max(highest, int(m.group(1)))
    return out_dir, name, highest + 1, out_dir.relative_to(base).as_posix() if out_dir != base else ""


def _load_image_file(env, image: str) -> Image.Image:
    path = env.annotated_path(image, default="input")
    if path is None or not path.is_file():
        raise NodeError(f"Invalid image file: {image}")
    from ...images import open_image

    return open_image(path)


class LoadImage(Node):
    CATEGORY, DISPLAY_NAME = "image", "Load Image"
    RETURN_TYPES = ("IMAGE", "MASK")
    CUSTOM_VALIDATED = ("image",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"image": [env.input_images(), {"image_upload": True}]}}

    @classmethod
    def validate(cls, env, image=None, **_):
        path = env.annotated_path(str(image), default="input")
        return True if path is not None and path.is_file() else f"Invalid image file: {image}"

    @classmethod
    def is_changed(cls, env, image=None, **_):
        path = env.annotated_path(str(image), default="input")
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def run(self, rt, image):
        img = ImageOps.exif_transpose(_load_image_file(rt.env, image))
        rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
        if "A" in img.getbands():
            alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
            mask = 1.0 - torch.from_numpy(alpha)[None]
        else:
            mask = torch.zeros((1, 64, 64))
        return rgb, mask


class LoadImageMask(Node):
    CATEGORY, DISPLAY_NAME = "mask", "Load Image (as Mask)"
    RETURN_TYPES = ("MASK",)
    CUSTOM_VALIDATED = ("image",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"image": [env.input_images(), {"image_upload": True}],
                             "channel": [["alpha", "red", "green", "blue"]]}}

    validate = LoadImage.validate
    is_changed = LoadImage.is_changed

    def run(self, rt, image, channel):
        img = ImageOps.exif_transpose(_load_image_file(rt.env, image))
        band = {"alpha": "A", "red": "R", "green": "G", "blue": "B"}[channel]
        if img.mode not in ("RGBA", "RGB"):
            img = img.convert("RGBA")
        if band not in img.getbands():
            return (torch.zeros((1, 64, 64)),)
        arr = torch.from_numpy(np.asarray(img.getchannel(band), dtype=np.float32) / 255.0)
        return ((1.0 - arr if band == "A" else arr)[None],)


class ImagePadForOutpaint(Node):
    CATEGORY, DISPLAY_NAME = "image", "Pad Image for Outpainting"
    RETURN_TYPES = ("IMAGE", "MASK")

    @classmethod
    def inputs(cls, env):
        side = INT(0, 0, MAX_RESOLUTION, 8)
        return {"required": {"image": ["IMAGE"], "left": side, "top": side, "right": side, "bottom": side,
                             "feathering": INT(40, 0, MAX_RESOLUTION)}}

    def run(self, rt, image, left, top, right, bottom, feathering):
        b, h, w, c = image.shape
        out = torch.full((b, h + top + bottom, w + left + right, c), 0.5)
        out[:, top:top + h, left:left + w] = image
        mask = torch.ones((h + top + bottom, w + left + right))
        inner = torch.zeros((h, w))
        if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
            for i in range(h):
                for j in range(w):
                    dt = i if top != 0 else h
                    db = h - i if bottom != 0 else h
                    dl = j if left != 0 else w
                    dr = w - j if right != 0 else w
                    d = min(dt, db, dl, dr)
                    if d < feathering:
                        inner[i, j] = ((feathering - d) / feathering) ** 2
        mask[top:top + h, left:left + w] = inner
        return out, mask[None]


class LoraLoader(Node):
    CATEGORY, DISPLAY_NAME = "loaders", "Load LoRA (Model and CLIP)"
    RETURN_TYPES = ("MODEL", "CLIP")

    @classmethod
    def inputs(cls, env):
        strength = FLOAT(1.0, -100.0, 100.0, 0.01)
        return {"required": {"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [env.lora_names()],
                             "strength_model": strength, "strength_clip": strength}}

    def run(self, rt, model, clip, lora_name, strength_model, strength_clip):
        if clip.entry is None and strength_clip != 0:
            raise NodeError("a LoRA on text encoders loaded from files (TripleCLIPLoader) is not supported; "
                            "set strength_clip to 0 or load the checkpoint's own encoders")
        path = str(rt.env.find_lora(lora_name))
        if strength_model != 0:
            model = replace(model, loras=model.loras + ((lora_name, path, strength_model),))
        if strength_clip != 0:
            clip = replace(clip, loras=clip.loras + ((lora_name, path, strength_clip),))
        return model, clip


class LoraLoaderModelOnly(Node):
    CATEGORY, DISPLAY_NAME = "loaders", "Load LoRA"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"model": ["MODEL"], "lora_name": [env.lora_names()],
                             "strength_model": FLOAT(1.0, -100.0, 100.0, 0.01)}}

    def run(self, rt, model, lora_name, strength_model):
        if strength_model == 0:
            return (model,)
        path = str(rt.env.find_lora(lora_name))
        return (replace(model, loras=model.loras + ((lora_name, path, strength_model),)),)


# The nodes of ComfyUI's nodes.py that this module has (`registry.NODES` adds the extras').
CORE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    CheckpointLoaderSimple, CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner, CLIPSetLastLayer,
    ConditioningCombine, ConditioningConcat, ConditioningSetArea, ConditioningZeroOut, EmptyLatentImage, KSampler,
    KSamplerAdvanced, VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeForInpaint, VAELoader, SetLatentNoiseMask,
    LatentUpscale, LatentUpscaleBy, RepeatLatentBatch, LatentFromBatch, ImageScale, ImageScaleBy,
    ImageScaleToTotalPixels, InpaintModelConditioning, ImageInvert, ImagePadForOutpaint, SaveImage, PreviewImage,
    LoadImage, LoadImageMask, LoraLoader, LoraLoaderModelOnly,
)}


def node_info(name: str, cls: type[Node], env) -> dict:
    """One /object_info entry, as ComfyUI's server.py node_info writes it."""
    inputs = cls.inputs(env)
    order = {k: list(v) for k, v in inputs.items() if k in ("required", "optional")}
    info = {
        "input": inputs, "input_order": order, "is_input_list": False,
        "output": list(cls.RETURN_TYPES), "output_is_list": [False] * len(cls.RETURN_TYPES),
        "output_name": list(cls.RETURN_NAMES or cls.RETURN_TYPES),
        "name": name, "display_name": cls.DISPLAY_NAME or name, "description": cls.DESCRIPTION,
        "python_module": cls.PYTHON_MODULE, "category": cls.CATEGORY, "output_node": cls.OUTPUT_NODE,
    }
    if cls.DEPRECATED:
        info["deprecated"] = True  # only when set, as ComfyUI writes it
    return info
