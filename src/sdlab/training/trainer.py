"""The training loop: LoRA, textual inversion, fine-tuning and training from scratch, on one or many processes.

One `accelerate.Accelerator` drives everything, so the same code runs on a CPU, one GPU,
or several processes started by `accelerate launch` / `torchrun` (DDP). The data order,
the noise and the timesteps are all drawn from seeded generators shared by every rank:
each optimizer step takes one *global* batch (batch_size x processes x grad_accum items),
every rank draws the noise for the whole global batch and keeps its own slice. A run on
N processes therefore computes the same loss as one process with N times the batch, and
a resumed run continues with exactly the draws it would have made.

Scratch mode trains in two phases: first the VAE alone learns to reconstruct the images
(L1 + L2 + a small KL term) for `vae_steps`; it is then rescaled so its latents have the
spread the family's `latent_scale` assumes, frozen, and the UNet and text encoder train
together on its latents.
"""

from __future__ import annotations


import csv
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import device as devices
from ..checkpoints.diffusers_folder import write_diffusers_folder
from ..checkpoints.io import atomic_write, save_safetensors
from ..checkpoints.loader import Bundle, load_bundle, new_bundle, save_checkpoint
from ..errors import SdlabError
from ..families import FAMILIES, ModelConfig, with_prediction
from ..lora import kohya_name
from ..models.clip import CLIPTextConfig
from ..models.storage import set_dtypes
from ..models.unet import UNetConfig, sdxl_size_embedding
from ..models.vae import DiagonalGaussian, VAEConfig
from ..optional import require
from ..sampling.model_sampling import ModelSampling, discrete
from ..sampling.schedules import DiscreteSchedule, discrete_schedule, rescale_zero_terminal_snr
from ..text.conditioning import COMBINE_RULES, EncodedPrompt, caption_ids
from .config import ModelSpec, TrainConfig, check_for_family, parse_sample_prompt
from .data import BucketBatchSampler, CaptionedImageDataset, cache_latents, collate, process_caption
from .flow import FlowDenoising, FlowObjective, TextCache, TextInput, draw_timesteps, encode_text, t5_ids
from .losses import LossOptions, diffusion_loss, pyramid_noise
from .textual_inversion import TextualInversion, caption_with_token, embedding_metadata, save_embedding

log = logging.getLogger(__name__)

STATE_PATTERN = "state-*.pt"


# ----------------------------------------------------------------------------- model presets

def model_preset(spec: ModelSpec) -> ModelConfig:
    """The network configs `scratch` mode builds: a preset with per-network overrides."""
    presets = {
        # The shipped demo model: 64x64 images, VAE factor 4 (16x16x4 latents).
        "demo": (UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
                            transformer_depth=(0, 1, 1), transformer_depth_middle=1, num_heads=4, context_dim=128),
                 VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=32),
                 CLIPTextConfig(layout="openai", width=128, layers=2, heads=2, mlp_width=256)),
        # The test suite's size: seconds per step on a CPU.
        "tiny": (UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1),
                            transformer_depth_middle=1, num_heads=4, context_dim=64),
                 VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=32),
                 CLIPTextConfig(layout="openai", width=64, layers=2, heads=1, mlp_width=128)),
    }
    if spec.preset not in presets:
        raise SdlabError(f"model.preset must be one of {', '.join(presets)}, got {spec.preset!r}")
    # One text encoder and a plain UNet: SD 1.x / 2.x-style models (not inpainting, not SDXL).
    families = [n for n, f in FAMILIES.items() if not f.inpaint and not f.added_conditioning and len(f.text_encoders) == 1]
    if spec.family not in families:
        raise SdlabError(f"model.family must be one of {', '.join(families)} in scratch mode, got {spec.family!r}")
    unet, vae, te = presets[spec.preset]
    try:
        unet = replace(unet, **{k: tuple(v) if isinstance(v, list) else v for k, v in spec.unet.items()})
        vae = replace(vae, **{k: tuple(v) if isinstance(v, list) else v for k, v in spec.vae.items()})
        te = replace(te, **spec.text_encoder)
    except (TypeError, ValueError) as e:
        raise SdlabError(f"model: {e}") from None
    if unet.context_dim != te.width:
        raise SdlabError(f"model: unet.context_dim ({unet.context_dim}) must equal text_encoder.width ({te.width})")
    return ModelConfig(FAMILIES[spec.family], unet, vae, (te,))


class Denoising(nn.Module):
    """What one process runs per micro-batch: text encoding, UNet, loss. One module so that
    DDP sees every trained parameter (UNet, text encoder, LoRA, embedding vectors) in one place."""

    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], lora: nn.Module | None, loss: LossOptions,
                 train_text_encoder: bool, text_skip: int = 1, text_final_norm: bool = True,
                 text_combine: str = "concat", sampling: ModelSampling | None = None,
                 embedding: TextualInversion | None = None):
        """`text_skip`, `text_final_norm`: the text encoder layer the UNet is conditioned on, as in
        `CLIPTextModel.forward` (SD 2.x: 2, the penultimate, then the final norm; SDXL: 2 without
        it), so that training sees the conditioning that sampling gives; `text_combine`: the
        family's rule for combining its encoders (`text.conditioning.COMBINE_RULES`); `sampling`:
        the model sampling on the training schedule, which noises the latents (by default SD's).
        `embedding`: textual inversion's vectors, put in at the tokens' `EMBEDDING_TOKEN` ids."""
        super().__init__()
        self.unet, self.text_encoders, self.lora = unet, nn.ModuleList(text_encoders), lora
        self.loss, self.train_text_encoder = loss, train_text_encoder
        self.text_skip, self.text_final_norm, self.text_combine = text_skip, text_final_norm, text_combine
        self.sampling = sampling if sampling is not None else discrete(discrete_schedule(), "eps")
        self.embedding = embedding

    def conditioning(self, tokens: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(context, pooled) for one (B, chunks, 77) id tensor per text encoder, as sampling encodes a
        prompt (`text.conditioning.encode_all`): each 77-token chunk encoded alone and the chunks'
        states concatenated, each encoder's pooled output of the first chunk, the encoders combined
        by the family's rule (SDXL: states side by side on the feature axis, bigG's pooled)."""
        encoded = []
        grad = self.train_text_encoder or self.embedding is not None
        for i, (te, ids) in enumerate(zip(self.text_encoders, tokens, strict=True)):
            b, chunks, length = ids.shape
            flat = ids.reshape(b * chunks, length)
            with nullcontext() if grad else torch.no_grad():
                inputs = None if self.embedding is None else self.embedding.inputs(i, te, flat)
                out = te(flat, skip=self.text_skip, embeddings=inputs, final_norm=self.text_final_norm)
            encoded.append(EncodedPrompt(out.hidden.reshape(b, chunks * length, -1),
                                         out.pooled.reshape(b, chunks, -1)[:, 0]))
        combined = COMBINE_RULES[self.text_combine](encoded)
        return combined.context, combined.pooled

    def forward(self, latents: Tensor, tokens: list[Tensor], noise: Tensor, timesteps: Tensor,
                alphas_cumprod: Tensor, size_ids: Tensor | None = None, input_noise: Tensor | None = None,
                loss_weights: Tensor | None = None, mask: Tensor | None = None,
                weighting_alphas_cumprod: Tensor | None = None) -> Tensor:
        """`size_ids`: SDXL's (B, 6) original size, crop top-left and target size, all (h, w).
        `input_noise`: the noise mixed into the UNet's input when it is not the target's
        (kohya's input perturbation, `ip_noise_gamma`). `loss_weights`: (B,) per-sample weights
        (regularization images: `prior_loss_weight`). `mask`: (B, 1, H, W) pixel weights (masked_loss).
        `weighting_alphas_cumprod`: see `diffusion_loss` (zero terminal SNR)."""
        context, pooled = self.conditioning(tokens)
        y = None if size_ids is None else torch.cat(
            [pooled, sdxl_size_embedding(size_ids.float(), self.unet.cfg.size_embed_dim)], dim=-1)
        mixed = noise if input_noise is None else input_noise
        # Noised as sampling mixes noise in: the model's ModelSampling, on the training schedule.
        noisy = self.sampling.training_input(timesteps, mixed, latents)
        pred = self.unet(noisy, timesteps.float(), context, None if y is None else y.to(context.dtype))
        loss = diffusion_loss(pred, latents, noise, timesteps, alphas_cumprod, self.loss, mask, weighting_alphas_cumprod)
        return (loss if loss_weights is None else loss * loss_weights.to(loss)).mean()


class Reconstruction(nn.Module):
    """Scratch mode's first phase: the VAE learns to reconstruct (L1 + L2 + KL * weight)."""

    def __init__(self, vae: nn.Module, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels: Tensor, eps: Tensor) -> Tensor:
        post = self.vae.encode(pixels)
        z = post.mean + post.std * eps
        rec = self.vae.decode(z)
        loss = F.l1_loss(rec, pixels) + F.mse_loss(rec, pixels)
        kl = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).mean()
        return loss + self.kl_weight * kl


@torch.no_grad()
def rescale_vae_latents(vae: nn.Module, std: float, latent_scale: float) -> None:
    """Change the VAE so its latents are `1 / (std * latent_scale)` times larger, without
    changing what it reconstructs: the encoder's mean (and std) are scaled in `quant_conv`,
    the decoder undoes it in `post_quant_conv`. Afterwards latents * latent_scale have unit
    spread, which is what the sampler's noise levels assume."""
    c = 1.0 / (std * latent_scale)
    n = vae.cfg.latent_channels
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    qc.weight[:n] *= c
    qc.bias[:n] *= c
    qc.bias[n:] += 2 * math.log(c)  # logvar of c * z
    pqc.weight /= c


# ----------------------------------------------------------------------------- the trainer

@dataclass
class _Progress:
    step: int = 0  # optimizer steps done, both phases
    batches: int = 0  # global batches consumed (the data order follows from it)


# diffusers' (and transformers') polynomial schedule ends at this learning rate, not at 0.
POLYNOMIAL_LR_END = 1e-7


def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0,
              lr: float = 1e-4) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step, as diffusers' `get_scheduler` (and so
    kohya's) computes it: a linear warm-up from 0 over `warmup` steps, then constant, linear to 0,
    cosine to 0, cosine with `num_cycles` hard restarts, or polynomial (`power`) down to
    `POLYNOMIAL_LR_END` (of a base rate `lr`). "constant" warms up too when `warmup` is set (it
    is "constant_with_warmup" then; diffusers' "constant" would ignore the warm-up)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "cosine_with_restarts":
            return 0.0 if progress >= 1 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
        end = POLYNOMIAL_LR_END / lr
        return end if step > total else (1 - end) * (1 - progress) ** power + end
    return factor


def _multi_process_cpu() -> bool:
    """Whether a launcher (torchrun, `accelerate launch`, mpirun) started several processes on a
    machine without a GPU. accelerate only sets up multi-CPU DDP (gloo) when told `cpu=True`:
    without it each torchrun child would silently train alone on the whole batch."""
    launched = any(int(os.environ.get(k, "1") or 1) > 1
                   for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return launched and not gpu


def adamw(params: list, **kw) -> torch.optim.AdamW:
    """torch.optim.AdamW, fused where this PyTorch and device have the fused kernel (one pass over
    all parameters instead of a loop of small ops per tensor: on a CPU 4-5x faster, 9.2 -> 1.9 ms
    for 256 LoRA tensors); the default implementation elsewhere. The same update up to rounding."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # a PyTorch before 2.4 has no fused CPU kernel
        return torch.optim.AdamW(params, **kw)


def _optimizer_class(path: str) -> type[torch.optim.Optimizer]:
    """The optimizer class named by its import path, e.g. "prodigyopt.Prodigy"."""
    import importlib

    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except ImportError:
        raise SdlabError(f"optimizer {path!r}: cannot import {module_name!r}; install the package that provides "
                         f"it (e.g. pip install {module_name.split('.')[0]})") from None
    except AttributeError:
        raise SdlabError(f"optimizer {path!r}: {module_name!r} has no {name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise SdlabError(f"optimizer {path!r} is not a torch.optim.Optimizer class")
    return cls


class Trainer:
    """Build with a TrainConfig, call `train()`. Tests drive it step by step."""

    def __init__(self, cfg: TrainConfig, accelerator=None, progress_bar: bool = True):
        require("accelerate", extra="train", purpose="training")  # one line, not a traceback, without it
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        # Fine-tuned text encoders hold parameters the loss never reaches (the layers after the one the
        # UNet reads; SDXL's CLIP-L final norm): DDP must look for them, or its second step fails.
        # (LoRA leaves those layers out, and scratch models read their last layer.)
        # An embedding's vectors get no gradient on a rank whose captions all lost the token (cut at
        # max_token_length): DDP is told to look, as it costs nothing next to the rest of a step.
        ddp = DistributedDataParallelKwargs(find_unused_parameters=(cfg.mode == "finetune" and cfg.train_text_encoder)
                                            or cfg.mode == "embedding")
        self.acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=_multi_process_cpu(),
                                              kwargs_handlers=[ddp])
        self.progress_bar = progress_bar
        self.device = self.acc.device
        self._determinism_before = (torch.are_deterministic_algorithms_enabled(),
                                    torch.is_deterministic_algorithms_warn_only_enabled())
        if cfg.deterministic:
            # On a GPU cuDNN's convolutions and the attention backward pass may sum in another order
            # each run; cuBLAS is reproducible only with this workspace setting, read when it starts.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)  # ops without such a kernel warn
        if self.device.type == "cpu":
            devices.reuse_freed_memory()  # no page faults on the large buffers every step makes
            half = devices.DTYPES.get(cfg.mixed_precision)
            if half is not None and (warning := devices.emulated_cpu_dtype_warning(
                    half, instead='set mixed_precision = "no" to train in fp32')):
                log.warning(warning)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.started_at = datetime.now(timezone.utc)
        torch.manual_seed(cfg.seed)  # module initialisation (LoRA down weights) is seeded too

        self.bundle = self._load_model()
        if cfg.zero_terminal_snr and cfg.mode != "lora":
            # The saved model says so (its ztsnr marker), so that it is sampled on that schedule.
            config = self.bundle.config
            self.bundle.config = replace(config, family=replace(config.family, zero_terminal_snr=True))
        self.prediction = self.bundle.prediction
        # SD3 / SD3.5: rectified flow (`training.flow`); the text encoders as loaded (T5 may leave
        # memory once its outputs are cached, `_fill_text_cache`).
        self.flow = self.bundle.family.is_flow
        self.objective = FlowObjective(cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                                       cfg.training_shift, cfg.precondition_outputs, cfg.min_timestep,
                                       cfg.max_timestep, cfg.loss_type, cfg.huber_c, cfg.huber_schedule,
                                       cfg.huber_scale) if self.flow else None
        self.text_slots = self.bundle.family.text_encoders[:len(self.bundle.text_encoders)]
        self.text_tokenizers = list(self.bundle.tokenizers)
        self.text_cache: TextCache | None = None
        fam = self.bundle.family  # the schedule the model was trained on (a diffusers folder may state its betas)
        self.alphas_cumprod = discrete_schedule(fam.beta_start, fam.beta_end).alphas_cumprod.to(self.device)
        self.weighting_alphas_cumprod = None
        if cfg.zero_terminal_snr:
            if self.prediction != "v":
                log.warning("zero_terminal_snr is meant for v-prediction models: at the last timestep the input "
                            "is pure noise, from which an eps-prediction model learns nothing about the image")
            self.weighting_alphas_cumprod = self.alphas_cumprod
            self.alphas_cumprod = rescale_zero_terminal_snr(self.alphas_cumprod.double(), terminal=0.0).float()
        self.dataset = CaptionedImageDataset(cfg.data)
        if len(self.dataset) == 0:
            raise SdlabError(f"{cfg.data.folder}: no training images")
        # cache_latents(_to_disk): the cache is filled by the first diffusion step (_fill_latent_cache),
        # when the VAE is final (a scratch model trains its own first; --resume loads it); until then
        # the data set gives pixels.
        if self.flow:
            self._check_sizes_fit_the_mmdit()
        self.latent_cache_root, self.dataset.latent_cache_dir = self.dataset.latent_cache_dir, None
        self.latents_cached = not (cfg.data.cache_latents or cfg.data.cache_latents_to_disk)
        self.global_batch = cfg.batch_size * self.world
        self.sampler = BucketBatchSampler(self.dataset.item_buckets, self.global_batch, seed=cfg.seed)
        self.batches_per_epoch = len(self.sampler)
        self.lora = None
        self.embedding: TextualInversion | None = None
        self.ema: dict[str, Tensor] | None = None
        self.progress = _Progress()
        self._warned_cut_captions = False
        self._warned_no_t5 = False
        self.phase = ""
        self._setup_phase("vae" if cfg.mode == "scratch" and cfg.vae_steps else "diffusion")
        self._csv = None

    # -- setup ------------------------------------------------------------

    def _load_model(self) -> Bundle:
        cfg = self.cfg
        if cfg.mode == "scratch":
            mcfg = model_preset(cfg.model)
            if cfg.prediction:
                mcfg = with_prediction(mcfg, cfg.prediction)
            # A new model's natural size is the size it is trained at (saved in its config).
            height, width = cfg.data.size  # a square of the same area where the two differ
            side = int(math.sqrt(height * width)) // 8 * 8
            mcfg = replace(mcfg, family=replace(mcfg.family, default_size=side))
            bundle = new_bundle(mcfg, seed=cfg.seed, name=cfg.output_name)
        else:
            # SD3: T5's tokens per caption as training reads them, so that validation samples alike.
            encoders = {k: v for k, v in (("clip_l", cfg.clip_l), ("clip_g", cfg.clip_g), ("t5xxl", cfg.t5xxl)) if v}
            bundle = load_bundle(cfg.base_model, device="cpu", dtype=torch.float32, prediction=cfg.prediction,
                                 t5_max_length=cfg.t5xxl_max_token_length, text_encoder_files=encoders or None)
            self._check_trainable(bundle)
        check_for_family(cfg, bundle.family)
        for net in bundle.networks().values():
            net.to(self.device)
        return bundle

    def _check_sizes_fit_the_mmdit(self) -> None:
        """SD3: every bucket a whole number of the MMDiT's patches, within its grid of positions."""
        b = self.bundle
        step = b.vae.cfg.downsample_factor * b.unet.cfg.patch_size
        largest = step * b.unet.cfg.pos_embed_max_size
        for h, w in sorted(set(self.dataset.item_buckets)):
            if h % step or w % step or max(h, w) > largest:
                raise SdlabError(f"data: {b.family.label} trains on sides that are multiples of {step} px, at most "
                                 f"{largest}; the size {w}x{h} is not: set data.resolution (and bucket_reso_steps) "
                                 f"to multiples of {step}")

    @staticmethod
    def _check_trainable(bundle: Bundle) -> None:
        fam = bundle.family
        if fam.inpaint:
            raise SdlabError(f"{fam.label}: training inpainting models is not supported; train its base model")
        if fam.added_conditioning == "sdxl-refiner":
            raise SdlabError(f"{fam.label}: training the SDXL refiner is not supported; train the SDXL base model")

    def _start_from(self, path: str) -> None:
        """Load `lora.network_weights` (kohya in either UNet spelling, or diffusers/PEFT) into the
        fresh LoRA."""
        from ..checkpoints.io import read_state_dict
        from ..lora import as_kohya_tensors, load_lora

        if self.flow:  # SD3: kohya's names, or diffusers' split q / k / v fused back (`sd3_lora.to_kohya`)
            from .sd3_lora import to_kohya

            tensors, left_out = to_kohya(load_lora(path), self.bundle.unet.cfg)
        else:
            tensors, left_out = as_kohya_tensors(load_lora(path), self.bundle,
                                                 original_unet_names=bool(self.bundle.family.added_conditioning))
        if self.cfg.lora.algo in ("loha", "lokr"):  # LyCORIS factors, by the names this run writes
            tensors, left_out = dict(read_state_dict(path)), []
        unmatched, missing = self.lora.load_kohya_weights(tensors)
        unmatched += left_out
        if len(missing) == len(self.lora.loras):
            raise SdlabError(f"lora.network_weights {path}: none of its modules is one of this run's LoRA modules "
                             f"({', '.join(unmatched[:2])}, ...): a LoRA for another model, or trained on other layers?")
        if unmatched:
            log.warning("lora.network_weights %s: %d of its modules are not trained here (e.g. %s)",
                        path, len(unmatched), unmatched[0])
        if missing:
            log.warning("lora.network_weights %s: %d of this run's modules are not in it and start from zero (e.g. %s)",
                        path, len(missing), missing[0])

    def _text_layers_read(self, skip: int) -> list[int]:
        """For each CLIP text encoder, how many of its first layers the UNet's conditioning depends on:
        up to the one whose states it reads, and all of SDXL's second and SD3's two (their pooled outputs)."""
        b = self.bundle
        counts = [te.cfg.layers - skip + 1 for te in self._clips]
        if b.family.added_conditioning:
            counts[-1] = b.text_encoders[-1].cfg.layers
        if self.flow:
            counts = [te.cfg.layers for te in self._clips]
        return counts

    @property
    def _clips(self) -> list[nn.Module]:
        """The CLIP text encoders (SD3's T5 is never trained, and has no layers CLIP skip counts)."""
        return [te for te, slot in zip(self.bundle.text_encoders, self.text_slots) if slot.layout != "t5"]

    def _trained_encoders(self) -> list[bool]:
        """Per text encoder of the model as loaded, whether it trains (a LoRA on it, or fine-tuned)."""
        train = self._trained_text_encoder()
        return [train and slot.layout != "t5" for slot in self.text_slots]

    def _trained_text_encoder(self) -> bool:
        cfg = self.cfg
        if cfg.mode in ("lora", "embedding"):
            return cfg.mode == "lora" and cfg.lora.train_text_encoder
        return cfg.train_text_encoder or cfg.mode == "scratch"

    def _setup_phase(self, phase: str) -> None:
        cfg, b = self.cfg, self.bundle
        self.phase = phase
        for net in b.networks().values():
            net.requires_grad_(False).eval()
        if phase == "vae":
            b.vae.requires_grad_(True).train()
            module = Reconstruction(b.vae, cfg.vae_kl_weight)
            groups = [{"params": list(b.vae.parameters()), "lr": cfg.vae_lr}]
            total = cfg.vae_steps
        else:
            train_te = self._trained_text_encoder()
            # The layer sampling reads (pipeline.text_runners): the family's, moved back by CLIP skip.
            skip = min(b.family.clip_skip + cfg.clip_skip - 1, *(te.cfg.layers for te in self._clips))
            b.unet.gradient_checkpointing = cfg.gradient_checkpointing
            for te in b.text_encoders:  # only has an effect on the ones that train
                te.gradient_checkpointing = cfg.gradient_checkpointing
            if cfg.mode == "lora":
                from .lora_blocks import block_ranks, lr_weights
                from .lora_network import LoRANetwork

                self._frozen_base_in_mixed_precision()
                lc = cfg.lora
                if self.lora is None:
                    # kohya's SDXL scripts name the UNet's modules as the original UNet does.
                    sdxl = b.family.added_conditioning
                    lr_weight = lr_weights(sdxl, lc.down_lr_weight, lc.mid_lr_weight, lc.up_lr_weight,
                                           lc.block_lr_zero_threshold)
                    # (SD3: kohya's networks.lora_sd3, no UNet blocks; check_for_family refused block options.)
                    blocks = None if self.flow else block_ranks(
                        sdxl, lc.rank, lc.alpha, lc.conv_rank, lc.conv_alpha, lc.block_dims, lc.block_alphas,
                        lc.conv_block_dims, lc.conv_block_alphas, lr_weight)
                    self.lora = LoRANetwork(b.unet if lc.train_unet else None,
                                            self._clips if lc.train_text_encoder else None,
                                            lc.rank, lc.alpha, lc.conv_rank, lc.conv_alpha, lc.dropout,
                                            unet_names="original" if sdxl else "diffusers",
                                            text_layers=self._text_layers_read(skip),
                                            rank_dropout=lc.rank_dropout, module_dropout=lc.module_dropout,
                                            blocks=blocks, algo=lc.algo, factor=lc.factor,
                                            lycoris=lc.network_module == "lycoris.kohya").to(self.device)
                    if lc.dropout and lc.network_module == "lycoris.kohya":
                        log.warning("lora.dropout: LyCORIS's modules train without plain dropout (they ignore it "
                                    "too, outside their bypass mode); rank_dropout and module_dropout apply")
                    if lc.network_weights:
                        self._start_from(lc.network_weights)
                self.lora.apply()
                self.lora.train()
                b.unet.train()
                for te in self._clips if lc.train_text_encoder else ():
                    te.train()  # (no dropout in CLIP: this only lets gradient checkpointing act)
                groups = self.lora.optimizer_groups(cfg.lr, lc.text_encoder_lr or cfg.lr,
                                                    lc.loraplus_unet_lr_ratio or lc.loraplus_lr_ratio,
                                                    lc.loraplus_text_encoder_lr_ratio or lc.loraplus_lr_ratio)
            elif cfg.mode == "embedding":
                # Textual inversion: the model frozen (in the mixed-precision dtype, as a LoRA's base),
                # only the new vectors train. Gradients flow back through the frozen text encoders.
                if self.embedding is None:
                    ec = cfg.embedding
                    self.embedding = TextualInversion.from_init_word(b, ec.token_string, ec.init_word,
                                                                     ec.num_vectors_per_token).to(self.device)
                self._frozen_base_in_mixed_precision()
                for net in (b.unet, *b.text_encoders):
                    net.train()  # (no dropout in them: this only lets gradient checkpointing act)
                groups = [{"params": list(self.embedding.parameters()), "lr": cfg.lr}]
            else:
                b.unet.requires_grad_(True).train()
                groups = [{"params": list(b.unet.parameters()), "lr": cfg.lr}]
                if train_te:
                    for te in self._clips:
                        te.requires_grad_(True).train()
                    groups.append({"params": [p for te in self._clips for p in te.parameters()],
                                   "lr": cfg.text_encoder_lr or cfg.lr})
            groups = [g for g in groups if g["params"]]
            loss = LossOptions(prediction=self.prediction, loss_type=cfg.loss_type, huber_c=cfg.huber_c,
                               huber_schedule=cfg.huber_schedule, huber_scale=cfg.huber_scale,
                               min_snr_gamma=cfg.min_snr_gamma,
                               scale_v_pred_loss_like_noise_pred=cfg.scale_v_pred_loss_like_noise_pred,
                               debiased_estimation_loss=cfg.debiased_estimation_loss)
            if self.flow:
                if cfg.cache_text_encoder_outputs and self.text_cache is None:
                    self._fill_text_cache(skip)
                encoders = [b.text_encoders[i] if i < len(b.text_encoders) else None for i in range(len(self.text_slots))]
                module = FlowDenoising(b.unet, encoders, self.lora, self.objective, self._trained_encoders(), skip)
            else:
                sampling = discrete(DiscreteSchedule.from_alphas_cumprod(self.alphas_cumprod), b.family.prediction)
                module = Denoising(b.unet, b.text_encoders, self.lora, loss, train_te, skip,
                                   b.family.text_final_norm, b.family.text_combine, sampling, self.embedding)
            total = self.diffusion_steps
        self.trained = [p for g in groups for p in g["params"]]
        self.optimizer = self._make_optimizer(groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total, cfg.lr_scheduler_num_cycles,
                                      cfg.lr_scheduler_power, groups[0]["lr"]))
        self.module, self.optimizer = self.acc.prepare(module, self.optimizer)
        if phase == "diffusion" and cfg.ema_decay:
            self.ema = {str(i): p.detach().float().clone() for i, p in enumerate(self.trained)}

    def _frozen_base_in_mixed_precision(self) -> None:
        """Under mixed precision, keep a LoRA's frozen UNet and text encoders in that dtype, as
        diffusers' and kohya's LoRA scripts do. In fp32, autocast casts every weight again in every
        forward and keeps the copies for backward: the same numbers for the matrix products, but
        an SD 1.5 LoRA step at 512 px peaks at 5.0 instead of 2.8 GiB and takes 15-20% longer (bf16,
        2-core CPU). Cast, the norms and embeddings also compute from rounded weights (bf16 rounding).
        The LoRA itself stays fp32 and the VAE as loaded (it only encodes; SD's VAE overflows in fp16).
        With `fp8_base` the matrices are kept in fp8 and upcast to that dtype as each layer runs."""
        dtype = devices.DTYPES.get(self.cfg.mixed_precision)  # None for "no"
        if dtype is not None:
            for net in (self.bundle.unet, *self.bundle.text_encoders):
                set_dtypes(net.requires_grad_(False), dtype, torch.float8_e4m3fn if self.cfg.fp8_base else None)

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        try:
            return self._new_optimizer(groups)
        except TypeError as e:  # an argument in optimizer_args that the class does not take
            raise SdlabError(f"optimizer {self.cfg.optimizer!r}: {e}; check optimizer_args") from None

    def _new_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        cfg = self.cfg
        kw = {"betas": tuple(cfg.adam_betas), "weight_decay": cfg.weight_decay, **cfg.optimizer_args}
        if cfg.optimizer == "adamw8bit":
            bnb = require("bitsandbytes", extra=None, purpose="optimizer adamw8bit",
                          otherwise='use optimizer = "adamw"')
            return bnb.optim.AdamW8bit(groups, **kw)
        if cfg.optimizer == "adamw":
            return adamw(groups, **kw)
        return _optimizer_class(cfg.optimizer)(groups, **cfg.optimizer_args)

    # -- data -------------------------------------------------------------

    def _global_batches(self):
        """Global batches (index lists) from `progress.batches` on, epoch after epoch."""
        while True:
            epoch, skip = divmod(self.progress.batches, self.batches_per_epoch)
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            for indices in list(self.sampler)[skip:]:
                yield indices

    def _part(self, n: int, rank: int) -> slice:
        """The items of a global batch of `n` that `rank` trains on (the last batch of a bucket may be short)."""
        per = math.ceil(n / self.world)
        lo = min(rank * per, n - 1)
        return slice(lo, max(lo + 1, min(n, (rank + 1) * per)))

    def _local(self, indices: list[int]) -> tuple[dict, slice]:
        """This rank's share of a global batch."""
        part = self._part(len(indices), self.rank)
        return collate([self.dataset[i] for i in indices[part]]), part

    def _global_channel_means(self, latents: Tensor, n: int) -> Tensor:
        """(n, C): each latent channel's mean for every item of the global batch, gathered from
        the ranks (adaptive_noise_scale sets the offset noise of the whole batch from them)."""
        means = latents.float().mean(dim=(2, 3))
        if self.world == 1:
            return means.cpu()
        per = math.ceil(n / self.world)
        padded = means.new_zeros(per, means.shape[1])
        padded[:len(means)] = means
        gathered = self.acc.gather(padded).view(self.world, per, -1).cpu()
        out = torch.empty(n, means.shape[1])
        for rank in range(self.world):
            part = self._part(n, rank)
            out[part] = gathered[rank, :part.stop - part.start]
        return out

    def _tokens(self, captions: list[str]) -> list[Tensor]:
        """(B, chunks, 77) token ids for each text encoder (SDXL's two pad differently). Textual
        inversion: each caption with the token (`caption_with_token`), its positions marked."""
        sizes = None
        if self.embedding is not None:
            ec, tok = self.cfg.embedding, self.bundle.tokenizers[0]
            token_ids = tok.encode(ec.token_string)
            captions = [caption_with_token(c, ec.token_string, token_ids, tok.encode, ec.caption_template)
                        for c in captions]
            sizes = {ec.token_string: self.embedding.num_vectors}
        ids, cut = caption_ids(captions, self.bundle.tokenizers, self.cfg.max_token_length // 75, sizes)
        if cut and not self._warned_cut_captions:
            self._warned_cut_captions = True
            log.warning("captions longer than max_token_length = %d tokens are cut (%d in this batch); "
                        "set max_token_length = 150 or 225 to keep them", self.cfg.max_token_length, cut)
        return [t.to(self.device) for t in ids]

    def _text_ids(self, captions: list[str], which: list[int]) -> dict[int, Tensor]:
        """SD3: token ids of text encoders `which` (indices into the family's slots): each CLIP's
        (B, chunks, 77), as `_tokens` makes them; T5's (B, t5xxl_max_token_length)."""
        toks, out, cut = self.text_tokenizers, {}, 0
        clips = [i for i in which if self.text_slots[i].layout != "t5"]
        if clips:
            ids, cut = caption_ids(captions, [toks[i] for i in clips], self.cfg.max_token_length // 75)
            out.update(zip(clips, ids))
        for i in which:
            if self.text_slots[i].layout == "t5":
                out[i], t5_cut = t5_ids(captions, toks[i], self.cfg.t5xxl_max_token_length)
                if t5_cut and not self._warned_cut_captions:
                    self._warned_cut_captions = True
                    log.warning("captions longer than t5xxl_max_token_length = %d T5 tokens are cut (%d in this "
                                "batch); set it higher (and sample with --t5-max-length alike)",
                                self.cfg.t5xxl_max_token_length, t5_cut)
        if cut and not self._warned_cut_captions:
            self._warned_cut_captions = True
            log.warning("captions longer than max_token_length = %d CLIP tokens are cut (%d in this batch); "
                        "set max_token_length = 150 or 225 to keep them", self.cfg.max_token_length, cut)
        return {i: t.to(self.device) for i, t in out.items()}

    def _flow_texts(self, captions: list[str]) -> list[TextInput]:
        """SD3: what each text encoder gives for a batch: its cached outputs, or ids to encode now."""
        cached = {}
        if self.text_cache is not None:
            cached = dict(zip(self.text_cache.encoders, self.text_cache.batch(captions, self.device)))
        ids = self._text_ids(captions, [i for i in range(len(self.text_slots)) if i not in cached])
        return [cached[i] if i in cached else ids[i] for i in range(len(self.text_slots))]

    def _fill_text_cache(self, skip: int) -> None:
        """kohya's cache_text_encoder_outputs: every caption through the text encoders that do not
        train, once (in the mixed-precision dtype they train in), kept in memory (and with _to_disk
        in files for later runs); then T5, which never trains, leaves the model."""
        cfg, b, ds = self.cfg, self.bundle, self.dataset
        which = [i for i, trains in enumerate(self._trained_encoders()) if not trains]
        random = [name for name in ("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                                    "shuffle_caption", "enable_wildcard")
                  if any(getattr(ds.options(r), name) for r in range(len(ds.records)))]
        if random:
            raise SdlabError(f"cache_text_encoder_outputs: data.{random[0]} changes the captions from step to step, "
                             "so they cannot be encoded once; turn one of them off (kohya refuses this too)")
        rng = np.random.default_rng(0)  # no option that draws from it is on
        captions = [process_caption(rec.caption, ds.options(r), rng, 0) for r, rec in enumerate(ds.records)]
        folder = None
        if cfg.cache_text_encoder_outputs_to_disk:
            root = cfg.data.folder.parent if cfg.data.folder.is_file() else cfg.data.folder
            folder = root / ".te_cache" / self._text_cache_fingerprint(which, skip)
        encoders = [b.text_encoders[i] for i in which]

        def encode(chunk: list[str]) -> list[list[tuple[Tensor, Tensor]]]:
            ids = self._text_ids(chunk, which)
            with torch.no_grad(), self.acc.autocast():
                encoded = encode_text(encoders, [ids[i] for i in which], skip, [False] * len(which))
            return [[(e.context[j], e.pooled[j]) for e in encoded] for j in range(len(chunk))]

        cache = TextCache(which, folder)
        if folder is not None and not self.acc.is_main_process:
            self.acc.wait_for_everyone()  # the main process writes the files, the others read them
        cache.fill(captions, encode, cfg.text_encoder_batch_size, write=self.acc.is_main_process)
        if folder is not None and self.acc.is_main_process:
            self.acc.wait_for_everyone()
        self.text_cache = cache
        t5 = [i for i in which if self.text_slots[i].layout == "t5"]
        if t5:
            # The model as a file without T5 loads: its family and config name the CLIP encoders alone.
            keep = [i for i in range(len(b.text_encoders)) if i not in t5]
            family = replace(b.family, text_encoders=tuple(b.family.text_encoders[i] for i in keep))
            b.config = replace(b.config, family=family, text_encoders=tuple(b.config.text_encoders[i] for i in keep))
            b.text_encoders = [b.text_encoders[i] for i in keep]
            b.tokenizers = [b.tokenizers[i] for i in keep]
            log.info("text encoder outputs of %d captions cached; T5 is no longer needed and left memory",
                     len(set(captions)))

    def _text_cache_fingerprint(self, which: list[int], skip: int) -> str:
        """Names what the cached outputs depend on: the encoders' weights (every 1009th value of
        each tensor, with its name, shape and dtype: seconds for T5-XXL), the layer read, the token
        lengths and the dtype they ran in."""
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{skip}:{self.cfg.max_token_length}:{self.cfg.t5xxl_max_token_length}:"
                 f"{self.cfg.mixed_precision}".encode())
        for i in which:
            for name, t in self.bundle.text_encoders[i].state_dict().items():
                h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().flatten()[::1009].float().cpu().numpy().tobytes())
        return h.hexdigest()

    def _size_ids(self, batch: dict) -> Tensor | None:
        """SDXL's size conditioning numbers for the batch (None for other families)."""
        if self.bundle.family.added_conditioning is None:
            return None
        return torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).to(self.device)

    @torch.no_grad()
    def _latents(self, batch: dict, gen: torch.Generator, n: int, part: slice) -> Tensor:
        """This rank's latents; the posterior sample is drawn for the whole global batch of `n`
        items (this rank keeping `part`), so the draws after it are the same on every rank."""
        if "latents" in batch:  # the posterior's moments, from the cache (_fill_latent_cache)
            post = DiagonalGaussian(batch["latents"].to(self.device))
        else:
            post = self.bundle.vae.encode(batch["pixels"].to(self.device))
        eps = torch.randn((n, *post.mean.shape[1:]), generator=gen)[part].to(self.device)
        fam = self.bundle.family  # SD3's latent space is shifted too: (z - shift) * scale
        return (post.mean + post.std * eps - fam.latent_shift) * fam.latent_scale

    def _fill_latent_cache(self) -> None:
        """Encode every training image once with the diffusion phase's VAE and read latents from
        there on (data.cache_latents, in memory on every process; data.cache_latents_to_disk, in
        files the main process writes). The cache keeps the posterior's moments (mean and
        log-variance), not one sample of it, so each step still draws its own latent from the
        generator: training takes the same steps as without the cache. The cache folder is named
        after the encoder's weights, so another VAE (another model, a retrained scratch VAE) never
        reads latents it did not make."""
        vae = self.bundle.vae

        def moments(pixels: Tensor) -> Tensor:
            post = vae.encode(pixels.to(self.device))
            return torch.cat([post.mean, post.logvar], dim=1)

        kw = dict(batch_size=self.cfg.vae_batch_size, progress=self.progress_bar and self.acc.is_main_process)
        if self.cfg.data.cache_latents_to_disk:
            folder = self.latent_cache_root / encoder_fingerprint(vae)
            if self.acc.is_main_process:
                cache_latents(self.dataset, moments, folder, **kw)
            self.acc.wait_for_everyone()
            self.dataset.latent_cache_dir = folder
        else:
            cache_latents(self.dataset, moments, in_memory=True, **kw)
        self.latents_cached = True

    # -- one step ---------------------------------------------------------

    def _noise_and_timesteps(self, shape: tuple[int, ...], gen: torch.Generator,
                             channel_means: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """For the whole global batch, from the generator every rank shares: the noise (with kohya's
        noise offset and multires options), the timesteps, and the noise mixed into the UNet's input
        when it differs (kohya's input perturbation), else None. Options that are off draw nothing.
        `channel_means`: (B, C) the latents' channel means, for adaptive_noise_scale."""
        cfg = self.cfg

        def strength(value: float, random: bool) -> float:  # kohya's *_random_strength: uniform in [0, value)
            return value * torch.rand((), generator=gen).item() if random else value

        noise = torch.randn(shape, generator=gen)
        if cfg.noise_offset:
            offset = strength(cfg.noise_offset, cfg.noise_offset_random_strength)
            if cfg.adaptive_noise_scale:
                assert channel_means is not None
                offset = (offset + cfg.adaptive_noise_scale * channel_means.abs()).clamp(min=0).view(*shape[:2], 1, 1)
            noise = noise + offset * torch.randn(shape[:2] + (1, 1), generator=gen)
        if cfg.multires_noise_iterations:
            noise = pyramid_noise(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, gen)
        if self.flow:  # kohya's SD3 draw: the weighting scheme's density, shifted (sigma = t / 1000)
            t = draw_timesteps(self.objective, shape[0], gen)
        else:
            t = torch.randint(cfg.min_timestep, cfg.max_timestep, (shape[0],), generator=gen)
        mixed = None
        if cfg.ip_noise_gamma:
            gamma = strength(cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength)
            mixed = noise + gamma * torch.randn(shape, generator=gen)
        return noise, t, mixed

    def train_step(self, batches) -> float:
        """One optimizer step over `grad_accum` global batches; returns the mean loss over all ranks."""
        cfg = self.cfg
        if self.phase == "diffusion" and not self.latents_cached:
            self._fill_latent_cache()
        self.module.train()
        losses = []
        for micro in range(cfg.grad_accum):
            indices = next(batches)
            self.progress.batches += 1
            # Draws for the whole global batch, seeded by (seed, batch number): identical on every
            # rank, the same after a resume, each rank keeping its slice.
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.progress.batches)
            batch, part = self._local(indices)
            sync = micro == cfg.grad_accum - 1
            with (nullcontext() if sync else self.acc.no_sync(self.module)), self.acc.autocast():
                if self.phase == "vae":
                    pixels = batch["pixels"].to(self.device)
                    lat_shape = (len(indices), self.bundle.vae.cfg.latent_channels,
                                 pixels.shape[2] // self.bundle.vae.cfg.downsample_factor,
                                 pixels.shape[3] // self.bundle.vae.cfg.downsample_factor)
                    eps = torch.randn(lat_shape, generator=gen)[part].to(self.device)
                    loss = self.module(pixels, eps)
                else:
                    latents = self._latents(batch, gen, len(indices), part)
                    means = self._global_channel_means(latents, len(indices)) if cfg.adaptive_noise_scale else None
                    noise, t, mixed = self._noise_and_timesteps((len(indices), *latents.shape[1:]), gen, means)
                    mask = batch["mask"].to(self.device) if cfg.masked_loss else None
                    if self.flow:
                        loss = self.module(latents, self._flow_texts(batch["caption"]), noise[part].to(self.device),
                                           t[part].to(self.device), batch["loss_weight"].to(self.device), mask)
                    else:
                        loss = self.module(latents, self._tokens(batch["caption"]), noise[part].to(self.device),
                                           t[part].to(self.device), self.alphas_cumprod, self._size_ids(batch),
                                           None if mixed is None else mixed[part].to(self.device),
                                           batch["loss_weight"].to(self.device), mask, self.weighting_alphas_cumprod)
                self.acc.backward(loss / cfg.grad_accum)
            losses.append(loss.detach())
        if cfg.max_grad_norm:
            self.acc.clip_grad_norm_(self.trained, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self._update_ema()
        loss = torch.stack(losses).mean()
        return self.acc.reduce(loss, reduction="mean").item() if self.world > 1 else loss.item()

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        n = self.progress.step - self.cfg.vae_steps
        # Warm-up of the decay (as diffusers' EMAModel): early averages forget the random init fast.
        decay = min(self.cfg.ema_decay, (1 + n) / (10 + n))
        for i, p in enumerate(self.trained):
            self.ema[str(i)].lerp_(p.detach().float(), 1 - decay)

    # -- the loop ---------------------------------------------------------

    @property
    def diffusion_steps(self) -> int:
        """`steps`, or with `epochs` the optimizer steps that take that many passes over the data."""
        cfg = self.cfg
        return math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum) if cfg.epochs else cfg.steps

    @property
    def total_steps(self) -> int:
        return (self.cfg.vae_steps if self.cfg.mode == "scratch" else 0) + self.diffusion_steps

    def train(self, resume: bool = False, max_steps: int | None = None) -> Path | None:
        """Run to the end (or `max_steps` total steps, for tests); returns the saved model path."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if resume:
            self.resume()
        stop = min(self.total_steps, max_steps or self.total_steps)
        self.cfg.output_dir.mkdir(parents=True, exist_ok=True) if self.acc.is_main_process else None
        batches = self._global_batches()
        bar = tqdm(total=stop, initial=self.progress.step, desc="train", unit="step",
                   disable=not (self.progress_bar and self.acc.is_main_process))
        t0, steps0 = time.perf_counter(), self.progress.step
        deadline = time.monotonic() + 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None
        while self.progress.step < stop:
            if deadline is not None and time.monotonic() > deadline and self.phase == "diffusion":
                log.warning("time limit of %g minutes reached at step %d: saving", cfg.time_limit_minutes, self.progress.step)
                stop = self.progress.step
                break
            epoch_before = self.progress.batches // self.batches_per_epoch
            loss = self.train_step(batches)
            step = self.progress.step
            epoch = self.progress.batches // self.batches_per_epoch
            if not math.isfinite(loss):
                raise SdlabError(f"step {step}: the loss is {loss}; lower lr or use mixed_precision = \"no\"")
            rate = (step - steps0) / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss:.4f}", phase=self.phase, it_s=f"{rate:.2f}")
            bar.update(1)
            self._log(step, loss)
            if self.phase == "vae" and step == cfg.vae_steps:
                self._finish_vae_phase(batches)
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < self.total_steps:
                self.save_state()
                self.save_model(suffix=f"-step{step:06d}")
            if (cfg.save_every_n_epochs and epoch > epoch_before and epoch % cfg.save_every_n_epochs == 0
                    and step < self.total_steps):
                self.save_state()
                self.save_model(suffix=f"-{epoch:06d}")
            v = cfg.validation
            if self.phase == "diffusion" and v.prompts and (
                    (v.every_n_steps and step % v.every_n_steps == 0)
                    or (v.every_n_epochs and epoch > epoch_before and epoch % v.every_n_epochs == 0)):
                self.validate()
        bar.close()
        if self.progress.step < self.total_steps and deadline is None:
            self.save_state()
            return None
        path = self.save_model()
        if cfg.validation.prompts:
            self.validate()
        return path

    def _finish_vae_phase(self, batches) -> None:
        """Rescale the trained VAE to unit-spread latents, freeze it, start the diffusion phase."""
        vae = self.bundle.vae
        vae.eval()
        with torch.no_grad():
            # The spread of the latents over the first few batches of this epoch (same on every rank).
            sample = [self.dataset[i]["pixels"] for i in range(min(len(self.dataset), 64))]
            z = torch.cat([vae.encode(torch.stack(sample[i:i + 16]).to(self.device)).mean
                           for i in range(0, len(sample), 16)])
            std = z.float().std().item()
        rescale_vae_latents(vae, std, self.bundle.family.latent_scale)
        log.info("VAE phase done: latent std %.3f, rescaled to %.3f", std, 1 / self.bundle.family.latent_scale)
        self._setup_phase("diffusion")

    def close(self) -> None:
        """Flush the logs and, under a launcher, leave the process group together: a process
        that exits while gloo's threads still run aborts ("terminate called without an active
        exception") and the launcher then kills the other ranks."""
        if self._csv is not None:
            self._csv.close()
            if self._tb is not None:
                self._tb.close()
            self._csv = None
        if self.world > 1:
            self.acc.wait_for_everyone()
        self.acc.end_training()
        enabled, warn_only = self._determinism_before
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)

    # -- logging and validation -------------------------------------------

    def _log(self, step: int, loss: float) -> None:
        if not self.acc.is_main_process:
            return
        if self._csv is None:
            path = self.cfg.output_dir / "log.csv"
            new = not path.exists()
            self._csv = open(path, "a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._csv)
            if new:
                self._writer.writerow(["step", "phase", "loss", "lr", "time"])
            self._tb = None
            if self.cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.cfg.output_dir / "tensorboard"))
                except ImportError:
                    log.warning("tensorboard is not installed (pip install tensorboard); logging to log.csv only")
        lr = self.scheduler.get_last_lr()[0]
        self._writer.writerow([step, self.phase, f"{loss:.6f}", f"{lr:.3e}", f"{time.time():.1f}"])
        if step % self.cfg.log_every_n_steps == 0:
            self._csv.flush()
        if self._tb is not None:
            self._tb.add_scalar(f"loss/{self.phase}", loss, step)
            self._tb.add_scalar("lr", lr, step)

    def validate(self) -> list[Path]:
        """Images for the validation prompts and seeds (main process), in `<output>/samples`."""
        if not self.acc.is_main_process:
            return []
        from ..pipeline import Pipeline

        v, out = self.cfg.validation, self.cfg.output_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        if len(self.bundle.text_encoders) < len(self.text_slots) and not self._warned_no_t5:
            self._warned_no_t5 = True
            log.warning("validation images are made without T5 (cache_text_encoder_outputs freed it), from the "
                        "CLIP encoders alone: they show the LoRA less well than images with T5 would")
        nets = self.bundle.networks()
        modes = {k: n.training for k, n in nets.items()}
        for n in nets.values():
            n.eval()
        paths = []
        try:
            pipe = Pipeline(self.bundle)
            if self.embedding is not None:
                # The prompts name it by the token, as the captions do: the vectors of now, in a file of
                # that name (the infotext hashes it), the only embedding the samples know.
                from ..embeddings import EmbeddingLibrary

                folder = out / "embedding"
                save_embedding(self.embedding, folder / f"{self.cfg.embedding.token_string}.safetensors",
                               self.cfg.embedding.token_string, self.progress.step, torch.float32,
                               self.cfg.base_model, {})
                pipe.embeddings = EmbeddingLibrary(folder)
            height, width = self.cfg.data.size
            for i, line in enumerate(v.prompts):
                p = parse_sample_prompt(line)
                for seed in v.seeds if p.seed is None else (p.seed,):
                    img = pipe.txt2img(p.prompt, negative_prompt=p.negative, seed=seed, steps=p.steps or v.steps,
                                       cfg_scale=p.cfg_scale or v.cfg_scale, sampler=p.sampler or v.sampler,
                                       width=p.width or v.width or width, height=p.height or v.height or height,
                                       clip_skip=self.cfg.clip_skip,
                                       zero_terminal_snr=self.cfg.zero_terminal_snr or None)[0]
                    path = out / f"step{self.progress.step:06d}-p{i}-s{seed}.png"
                    img.save(path)
                    paths.append(path)
        except Exception as e:  # validation must never kill a long run
            log.warning("validation images failed at step %d: %s", self.progress.step, e)
        finally:
            for k, n in nets.items():
                n.train(modes[k])
        return paths

    # -- saving -----------------------------------------------------------

    def _networks_state(self) -> dict[str, Tensor]:
        """Everything that training changes (and resume must restore)."""
        if self.lora is not None:
            return {"lora." + k: v for k, v in self.lora.state_dict().items()}
        if self.embedding is not None:
            return {"embedding." + k: v for k, v in self.embedding.state_dict().items()}
        return {k: v for k, v in self.bundle.state_dict().items()}

    def save_state(self) -> Path | None:
        """Write `state/state-<step>.pt` atomically (weights, optimizer, scheduler, step, RNG, EMA)
        and keep the newest `keep_states`. Every rank must call it (it waits for all)."""
        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            state = {
                "step": self.progress.step, "batches": self.progress.batches, "phase": self.phase,
                "networks": {k: v.detach().cpu().clone() for k, v in self._networks_state().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": {k: v.cpu() for k, v in self.ema.items()} if self.ema is not None else None,
                "torch_rng": torch.get_rng_state(),
                "config": json.dumps(asdict(self.cfg), default=str),
            }
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
            path = self.cfg.state_dir / f"state-{self.progress.step:08d}.pt"
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            for old in sorted(self.cfg.state_dir.glob(STATE_PATTERN))[:-self.cfg.keep_states]:
                old.unlink(missing_ok=True)
        self.acc.wait_for_everyone()
        return path

    def resume(self, path: Path | None = None) -> None:
        """Continue from `path` or the newest state in `<output_dir>/state`."""
        if path is None:
            states = sorted(self.cfg.state_dir.glob(STATE_PATTERN))
            if not states:
                raise SdlabError(f"--resume: no saved training state in {self.cfg.state_dir}")
            path = states[-1]
        try:
            # Tensors, numbers and strings only: a state file someone swapped in cannot run code either.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SdlabError(f"{path}: cannot read the training state ({e})") from None
        if state["phase"] != self.phase:
            self.bundle.vae.eval()
            self._setup_phase(state["phase"])
        try:
            self._load_networks_and_optimizer(state)
        except (RuntimeError, KeyError, ValueError) as e:
            now = json.loads(json.dumps(asdict(self.cfg), default=str))  # as save_state wrote its own
            changed = _changed_settings(json.loads(state.get("config", "{}")), now)
            raise SdlabError(f"--resume: {path} was saved by a run set up differently"
                             f"{' (' + ', '.join(changed) + ')' if changed else ''}, so it does not fit this one "
                             f"({str(e).splitlines()[0][:200]}); resume with that run's settings, or train into "
                             "another output_dir") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if state["ema"] is not None:
            self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        torch.set_rng_state(state["torch_rng"])
        self.progress = _Progress(state["step"], state["batches"])
        log.info("resumed from %s at step %d", path, self.progress.step)

    def _load_networks_and_optimizer(self, state: dict) -> None:
        nets = state["networks"]
        if self.lora is not None:
            self.lora.load_state_dict({k[len("lora."):]: v for k, v in nets.items()})
        elif self.embedding is not None:
            self.embedding.load_state_dict({k[len("embedding."):]: v for k, v in nets.items()})
        else:
            own = self.bundle.state_dict()
            with torch.no_grad():
                for k, v in nets.items():
                    own[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])

    def _ema_swapped(self):
        """Context: the trained parameters hold their EMA values inside the block."""
        trainer = self

        class _Swap:
            def __enter__(self):
                self.saved = None
                if trainer.ema is not None:
                    self.saved = [p.detach().clone() for p in trainer.trained]
                    with torch.no_grad():
                        for i, p in enumerate(trainer.trained):
                            p.copy_(trainer.ema[str(i)])

            def __exit__(self, *exc):
                if self.saved is not None:
                    with torch.no_grad():
                        for p, s in zip(trainer.trained, self.saved):
                            p.copy_(s)
        return _Swap()

    def save_model(self, suffix: str = "") -> Path | None:
        """The usable result: a kohya LoRA file, an embedding (the web UI's `.safetensors` or `.pt`),
        or a single-file checkpoint (EMA weights if on)."""
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            return None
        cfg = self.cfg
        name = f"{cfg.output_name}{suffix}"
        path = cfg.output_dir / f"{name}.safetensors"
        dtype = devices.DTYPES[cfg.save_dtype]
        with self._ema_swapped():
            if self.lora is not None:
                save_safetensors(self._lora_tensors(dtype), path, self.lora_metadata())
            elif self.embedding is not None:
                path = path.with_suffix(".pt") if cfg.save_model_as == "pt" else path
                save_embedding(self.embedding, path, cfg.output_name, self.progress.step, dtype, cfg.base_model,
                               embedding_metadata(cfg, self.bundle.family,
                                                  _modelspec_architecture(self.bundle.family, self.prediction)))
            elif cfg.save_model_as.startswith("diffusers"):
                path = cfg.output_dir / name
                write_diffusers_folder(self.bundle.state_dict(dtype), self.bundle.config, path, replace_existing=True)
            else:
                meta = {"sdlab.training": json.dumps({"mode": cfg.mode, "steps": self.progress.step,
                                                      "ema": bool(cfg.ema_decay)})}
                path = path.with_suffix(".ckpt") if cfg.save_model_as == "ckpt" else path
                save_checkpoint(self.bundle, path, dtype=dtype, metadata=meta)
                if len(self.bundle.text_encoders) < len(self.text_slots):  # T5 left with the text cache
                    log.info("%s holds no T5 (cache_text_encoder_outputs freed it, as kohya's SD3 files go without "
                             "it): give the base model's T5 with --t5 when sampling", path.name)
        log.info("saved %s", path)
        return path

    def _lora_tensors(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The LoRA file's tensors: kohya's layout, or with lora_format = "diffusers" (SD3) PEFT's."""
        sd = self.lora.kohya_state_dict(dtype)
        if self.cfg.lora_format == "diffusers":
            from .sd3_lora import to_diffusers

            # kohya's text-encoder names -> the modules' transformers paths (SD3's CLIPs: their own).
            te_paths = {kohya_name(path, part): path for part, te in zip(("te1", "te2"), self._clips)
                        for path, m in te.named_modules() if isinstance(m, nn.Linear)}
            sd = to_diffusers(sd, self.bundle.unet.cfg, te_paths)
        return sd

    def lora_metadata(self) -> dict[str, str]:
        cfg, lc = self.cfg, self.cfg.lora
        height, width = cfg.data.size
        meta = {
            "ss_network_module": "networks.lora_sd3" if self.flow else lc.network_module,
            "ss_network_dim": str(lc.rank),
            "ss_network_alpha": str(float(lc.alpha)),
            "ss_network_args": json.dumps(_network_args(lc)),
            "ss_network_dropout": str(lc.dropout),
            "ss_base_model_version": self.bundle.family.base_model_version,
            "ss_v2": str(self.bundle.family.name.startswith("sd2")),
            "ss_sd_model_name": Path(cfg.base_model or "").name,
            "ss_resolution": f"({width}, {height})",
            "ss_steps": str(self.progress.step),
            "ss_max_train_steps": str(self.diffusion_steps),
            "ss_epoch": str(self.progress.batches // max(1, self.batches_per_epoch)),
            "ss_learning_rate": str(cfg.lr),
            "ss_unet_lr": str(cfg.lr),
            "ss_text_encoder_lr": str(lc.text_encoder_lr or cfg.lr),
            "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_lr_warmup_steps": str(cfg.warmup_steps),
            "ss_optimizer": _optimizer_metadata(cfg.optimizer, cfg.optimizer_args),
            "ss_batch_size_per_device": str(cfg.batch_size),
            "ss_total_batch_size": str(cfg.batch_size * self.world * cfg.grad_accum),
            "ss_gradient_accumulation_steps": str(cfg.grad_accum),
            "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
            "ss_num_batches_per_epoch": str(self.batches_per_epoch),
            "ss_mixed_precision": cfg.mixed_precision,
            "ss_seed": str(cfg.seed),
            "ss_min_snr_gamma": str(cfg.min_snr_gamma or None),
            "ss_noise_offset": str(cfg.noise_offset or None),
            "ss_adaptive_noise_scale": str(cfg.adaptive_noise_scale or None),
            "ss_zero_terminal_snr": str(cfg.zero_terminal_snr),
            "ss_fp8_base": str(cfg.fp8_base),
            "ss_multires_noise_iterations": str(cfg.multires_noise_iterations or None),
            "ss_multires_noise_discount": str(cfg.multires_noise_discount),
            "ss_ip_noise_gamma": str(cfg.ip_noise_gamma or None),
            "ss_debiased_estimation": str(cfg.debiased_estimation_loss),
            "ss_loss_type": cfg.loss_type,
            "ss_huber_schedule": cfg.huber_schedule,
            "ss_huber_c": str(cfg.huber_c),
            "ss_huber_scale": str(cfg.huber_scale),
            "ss_caption_dropout_rate": str(cfg.data.caption_dropout_rate),
            "ss_caption_dropout_every_n_epochs": str(cfg.data.caption_dropout_every_n_epochs),
            "ss_caption_tag_dropout_rate": str(cfg.data.caption_tag_dropout_rate),
            "ss_shuffle_caption": str(cfg.data.shuffle_caption),
            "ss_flip_aug": str(cfg.data.flip_aug),
            "ss_color_aug": str(cfg.data.color_aug),
            "ss_random_crop": str(cfg.data.random_crop),
            "ss_cache_latents": str(cfg.data.cache_latents or cfg.data.cache_latents_to_disk),
            "ss_enable_bucket": str(cfg.data.enable_bucket),
            "ss_bucket_no_upscale": str(cfg.data.bucket_no_upscale),
            "ss_min_bucket_reso": str(cfg.data.min_bucket_reso),
            "ss_max_bucket_reso": str(cfg.data.max_bucket_reso),
            "ss_keep_tokens": str(cfg.data.keep_tokens),
            "ss_clip_skip": str(cfg.clip_skip if cfg.clip_skip > 1 else None),
            "ss_max_token_length": str(cfg.max_token_length if cfg.max_token_length > 75 else None),
            "ss_num_train_images": str(len(self.dataset) - self.dataset.regularization_items),
            **_dataset_metadata(self.dataset),
            "ss_num_reg_images": str(self.dataset.regularization_items),
            "ss_prior_loss_weight": str(cfg.data.prior_loss_weight),
            "ss_training_started_at": str(self.started_at.timestamp()),
            "ss_training_finished_at": str(time.time()),
            "ss_output_name": cfg.output_name,
            "ss_network_train_unet_only": str(not lc.train_text_encoder),
            "ss_network_train_text_encoder_only": str(not lc.train_unet),
            "modelspec.architecture": _modelspec_architecture(self.bundle.family, self.prediction) + "/lora",
            "modelspec.implementation": "sdlab",
            "modelspec.title": cfg.output_name,
            "modelspec.resolution": f"{width}x{height}",
            "modelspec.prediction_type": {"v": "v", "flow": "flow"}.get(self.prediction, "epsilon"),
        }
        if self.flow:  # kohya's SD3 keys (sd3_train_network.update_metadata), and the timestep shift
            meta.update({"ss_weighting_scheme": cfg.weighting_scheme, "ss_logit_mean": str(cfg.logit_mean),
                         "ss_logit_std": str(cfg.logit_std), "ss_mode_scale": str(cfg.mode_scale),
                         "ss_training_shift": str(cfg.training_shift),
                         "ss_precondition_outputs": str(cfg.precondition_outputs),
                         "ss_t5xxl_max_token_length": str(cfg.t5xxl_max_token_length),
                         "ss_apply_lg_attn_mask": "False", "ss_apply_t5_attn_mask": "False",
                         "ss_lora_format": cfg.lora_format})
        return meta


def encoder_fingerprint(vae: nn.Module) -> str:
    """A short hash of what `vae.encode` computes with: the encoder's weights, their names and dtype."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in vae.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def _network_args(lc) -> dict[str, str]:
    """kohya's `ss_network_args`: the `--network_args` a run gave, as strings (lists comma-separated,
    as they are written on kohya's command line)."""
    args = {"conv_dim": str(lc.conv_rank), "conv_alpha": str(float(lc.conv_alpha))} if lc.conv_rank else {}
    if lc.network_module == "lycoris.kohya":  # what LyCORIS's create_network reads: the algorithm first
        args = {"algo": lc.algo, **args, **({"factor": str(lc.factor)} if lc.algo == "lokr" else {}),
                **({"dropout": str(lc.dropout)} if lc.dropout else {})}
    for name in ("rank_dropout", "module_dropout", "block_dims", "block_alphas", "conv_block_dims",
                 "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
                 "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        value = getattr(lc, name)
        if value:
            args[name] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return args


def _dataset_metadata(dataset: CaptionedImageDataset) -> dict[str, str]:
    """kohya's per-folder metadata, which the web UIs show for a LoRA: the tags of the training
    captions by folder (`ss_tag_frequency`, counted once per image), each folder's repeats and
    image count (`ss_dataset_dirs`), and the buckets used (`ss_bucket_info`, sizes as width, height)."""
    tags: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for record in dataset.records:
        if record.regularization:
            continue
        folder = record.path.parent.name
        dirs.setdefault(folder, {"n_repeats": record.repeats, "img_count": 0})["img_count"] += 1
        counts = tags.setdefault(folder, {})
        for tag in (t.strip() for t in record.caption.split(dataset.config.caption_separator)):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    buckets = {str(i): {"resolution": [w, h], "count": n} for i, ((h, w), n) in enumerate(dataset.bucket_counts().items())}
    return {"ss_tag_frequency": json.dumps(tags), "ss_dataset_dirs": json.dumps(dirs),
            "ss_bucket_info": json.dumps({"buckets": buckets})}


# Settings a resumed run may change: how long it runs and what it writes along the way.
_RESUMABLE_CHANGES = {"steps", "epochs", "save_every_n_steps", "save_every_n_epochs", "keep_states", "validation",
                      "log_every_n_steps", "tensorboard", "time_limit_minutes", "num_workers"}


def _changed_settings(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """`key: saved -> now` for the settings that differ (nested tables as `lora.rank`)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        if not prefix and key in _RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{prefix}{key}.")
        elif str(a) != str(b):
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def _optimizer_metadata(optimizer: str, args: dict) -> str:
    """kohya's `ss_optimizer`: the class path, then the arguments, e.g. `prodigyopt.Prodigy(d_coef=2)`."""
    name = {"adamw8bit": "bitsandbytes.optim.AdamW8bit", "adamw": "torch.optim.AdamW"}.get(optimizer, optimizer)
    return name + (f"({','.join(f'{k}={v}' for k, v in args.items())})" if args else "")


def _modelspec_architecture(family, prediction: str) -> str:
    """The SAI ModelSpec architecture name, as kohya's scripts write it (`library/sai_model_spec.py`)."""
    if family.is_flow:  # kohya: "stable-diffusion-3-" + the MMDiT's type
        return {"sd3.5-large": "stable-diffusion-3-5-large", "sd3.5-medium": "stable-diffusion-3-5-medium"}.get(
            family.name, "stable-diffusion-3-medium")
    if family.added_conditioning:
        return "stable-diffusion-xl-v1-base"
    if family.name.startswith("sd2"):
        return "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def train(cfg: TrainConfig, resume: bool = False) -> Path | None:
    """Train as configured; returns the saved model (on the main process)."""
    trainer = Trainer(cfg)
    try:
        return trainer.train(resume=resume)
    finally:
        trainer.close()
