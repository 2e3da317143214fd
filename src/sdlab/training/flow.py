"""SD3 / SD3.5 training: the rectified-flow objective, the MMDiT's conditioning, and the text
encoders' outputs cached.

The latents are noised as sampling mixes noise in (`Flow.training_input`):
`noisy = sigma * noise + (1 - sigma) * latents`, the MMDiT called at timestep `sigma * 1000`.
The timesteps are drawn as kohya's `library/sd3_train_utils.get_noisy_model_input_and_timesteps`
draws them: `u` from the `weighting_scheme`'s density (diffusers'
`training_utils.compute_density_for_timestep_sampling`: logit-normal, "mode", or uniform), shifted
by `training_shift` (`u <- shift * u / (1 + (shift - 1) * u)`), then `t = int(u * (max - min) +
min)` and `sigma = t / 1000`. The loss (`flow_loss`) is kohya's (`sd3_train_network.py`):
the prediction preconditioned to x0 (`pred * -sigma + noisy`) against the latents, weighted by
the scheme (`compute_loss_weighting_for_sd3`: sigma_sqrt 1 / sigma^2, cosmap
2 / (pi (1 - 2 sigma + 2 sigma^2)), else 1); or with `precondition_outputs = false` diffusers'
other setting, the velocity against `noise - latents`, weighted the same way.

The conditioning is what sampling gives the MMDiT (`text.conditioning.sd3_features`): CLIP-L's and
CLIP-G's penultimate states (75-token chunks, as prompts), zero-padded to T5's width, then T5's
tokens; pooled = CLIP-L ++ CLIP-G. An encoder that does not train can be run once per caption
before training (`TextCache`, kohya's `cache_text_encoder_outputs`), so T5 leaves memory.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.io import read_state_dict, save_safetensors
from ..errors import SdlabError
from ..models.t5 import T5Encoder
from ..sampling.model_sampling import Flow
from ..text.conditioning import EncodedPrompt, sd3_features
from .losses import LossOptions, huber_threshold

log = logging.getLogger(__name__)

WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class FlowObjective:
    """How timesteps are drawn and the prediction's error becomes the loss, with kohya's names and
    defaults (`--weighting_scheme uniform`, `--training_shift 1.0`; the loss preconditioned to x0)."""

    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0  # logit_normal: u = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0
    mode_scale: float = 1.29  # "mode": u = 1 - u - mode_scale * (cos(pi u / 2)^2 - 1 + u)
    training_shift: float = 1.0  # > 1 draws noisier timesteps: u <- shift u / (1 + (shift - 1) u)
    precondition_outputs: bool = True  # kohya's (and diffusers' default); False: the velocity target
    min_timestep: int = 0
    max_timestep: int = 1000
    loss_type: str = "l2"  # "l2", "l1", or the pseudo-Huber "huber" / "smooth_l1" (kohya's conditional_loss)
    huber_c: float = 0.1
    huber_schedule: str = "constant"  # "constant" or "exponential" ("snr" needs a DDPM schedule)
    huber_scale: float = 1.0


def timestep_density(scheme: str, n: int, generator: torch.Generator, logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29) -> Tensor:
    """(n,) u in [0, 1]: diffusers' `compute_density_for_timestep_sampling` (which kohya copies),
    drawing from `generator`."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(n,), generator=generator))
    u = torch.rand((n,), generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def draw_timesteps(objective: FlowObjective, n: int, generator: torch.Generator) -> Tensor:
    """(n,) integer timesteps in [min_timestep, max_timestep) as kohya draws them; sigma = t / 1000."""
    o = objective
    u = timestep_density(o.weighting_scheme, n, generator, o.logit_mean, o.logit_std, o.mode_scale)
    shift = o.training_shift
    u = (u * shift) / (1 + (shift - 1) * u)
    return (u * (o.max_timestep - o.min_timestep) + o.min_timestep).long()


def loss_weighting(scheme: str, sigmas: Tensor) -> Tensor:
    """diffusers' `compute_loss_weighting_for_sd3` (kohya's copy): sigma_sqrt 1 / sigma^2, cosmap
    2 / (pi (1 - 2 sigma + 2 sigma^2)), otherwise 1. At sigma = 0 (timestep 0, which kohya's draw
    can give) sigma_sqrt's weight is infinite and kohya's loss NaN; here that sample weighs 0 (with
    the preconditioned prediction its error there is exactly 0 anyway)."""
    if scheme == "sigma_sqrt":
        return torch.where(sigmas > 0, sigmas.clamp(min=1e-30) ** -2.0, torch.zeros_like(sigmas)).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def flow_loss(pred: Tensor, noisy: Tensor, latents: Tensor, noise: Tensor, timesteps: Tensor,
              objective: FlowObjective = FlowObjective(), mask: Tensor | None = None) -> Tensor:
    """Per-sample loss (B,) of the MMDiT's velocity `pred` for `noisy` at `timesteps` (sigma * 1000),
    in kohya's order: the element-wise loss, times the scheme's weight, times the pixel `mask`
    (masked_loss, averaged down to the latents' size), then the mean of each sample."""
    o = objective
    sigmas = (timesteps.float() / 1000).view(-1, 1, 1, 1)
    pred = pred.float()
    if o.precondition_outputs:  # EDM's preconditioning: the x0 the velocity implies, against the latents
        pred, target = pred * -sigmas + noisy.float(), latents.float()
    else:
        target = noise.float() - latents.float()
    if o.loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif o.loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    else:
        options = LossOptions(huber_c=o.huber_c, huber_schedule=o.huber_schedule, huber_scale=o.huber_scale)
        c = huber_threshold(options, timesteps, torch.ones_like(timesteps, dtype=torch.float32)).view(-1, 1, 1, 1)
        loss = 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
        if o.loss_type == "huber":
            loss = loss * c
    loss = loss * loss_weighting(o.weighting_scheme, sigmas).to(loss)
    if mask is not None:
        loss = loss * F.interpolate(mask.to(loss), size=loss.shape[2:], mode="area")
    return loss.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- text


def t5_ids(captions: Sequence[str], tokenizer, length: int) -> tuple[Tensor, int]:
    """(B, length) T5 ids: each caption's tokens and EOS, padded with 0 to `length` as sampling pads
    a prompt (`text.t5_runner`), or cut to `length` with EOS last; and how many were cut."""
    rows, cut = [], 0
    for caption in captions:
        ids = tokenizer.encode(caption)
        if len(ids) > length:
            ids, cut = [*ids[:length - 1], tokenizer.eos_id], cut + 1
        rows.append(ids + [tokenizer.pad_id] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).view(len(rows), length), cut


# What one encoder gives the MMDiT for a batch: ids to encode now, or its cached (hidden, pooled).
TextInput = Tensor | tuple[Tensor, Tensor]


def encode_text(encoders: Sequence[nn.Module], inputs: Sequence[TextInput], text_skip: int,
                grad: Sequence[bool]) -> list[EncodedPrompt]:
    """Each encoder's (hidden, pooled) for a batch, as sampling encodes a prompt: a CLIP's
    (B, chunks, 77) ids one chunk at a time at layer `text_skip` without the final norm, the chunks'
    states concatenated and the first chunk's pooled output; T5's (B, L) ids as one sequence (no
    pooled output). A cached pair passes through. `grad`: per encoder, whether it trains."""
    out = []
    for te, x, trains in zip(encoders, inputs, grad, strict=True):
        if isinstance(x, tuple):
            out.append(EncodedPrompt(*x))
            continue
        with nullcontext() if trains else torch.no_grad():
            if isinstance(te, T5Encoder):
                out.append(EncodedPrompt(te(x), x.new_zeros((x.shape[0], 0), dtype=torch.float32)))
                continue
            b, chunks, length = x.shape
            enc = te(x.reshape(b * chunks, length), skip=text_skip, final_norm=False)
        out.append(EncodedPrompt(enc.hidden.reshape(b, chunks * length, -1), enc.pooled.reshape(b, chunks, -1)[:, 0]))
    return out


class FlowDenoising(nn.Module):
    """What one process runs per micro-batch of an SD3 model: the text encoders (or their cached
    outputs), the MMDiT, the loss. One module so that DDP sees every trained parameter."""

    def __init__(self, net: nn.Module, text_encoders: Sequence[nn.Module | None], lora: nn.Module | None,
                 objective: FlowObjective, trained_encoders: Sequence[bool], text_skip: int = 2):
        """`text_encoders`: CLIP-L, CLIP-G and T5 (None where only cached outputs are left);
        `trained_encoders`: which of them train (LoRA or fine-tune); `text_skip`: the CLIP layer
        sampling reads (2, the penultimate, for SD3)."""
        super().__init__()
        self.net, self.lora, self.objective = net, lora, objective
        self.text_encoders = nn.ModuleList(te if te is not None else nn.Identity() for te in text_encoders)
        self.trained_encoders, self.text_skip = tuple(trained_encoders), text_skip
        self.sampling = Flow(shift=1.0)  # only its noise mixing: training draws its own timesteps

    def conditioning(self, texts: Sequence[TextInput]) -> tuple[Tensor, Tensor | None]:
        """(context, y) of the MMDiT: `sd3_features` of the encoders' outputs, the context zero-padded
        to the MMDiT's width where T5 is absent (as the model adapter pads it at sampling)."""
        encoded = encode_text(list(self.text_encoders)[:len(texts)], texts, self.text_skip,
                              self.trained_encoders[:len(texts)])
        combined = sd3_features(encoded)
        context, width = combined.context, self.net.cfg.context_dim
        if context.shape[-1] < width:
            context = F.pad(context, (0, width - context.shape[-1]))
        return context, combined.pooled if self.net.cfg.adm_in_channels else None

    def forward(self, latents: Tensor, texts: Sequence[TextInput], noise: Tensor, timesteps: Tensor,
                loss_weights: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """`texts`: one `TextInput` per encoder; `timesteps`: (B,) integers (sigma * 1000);
        `loss_weights`: (B,) per-sample weights (prior_loss_weight); `mask`: (B, 1, H, W) pixel
        weights (masked_loss)."""
        context, y = self.conditioning(texts)
        noisy = self.sampling.training_input(timesteps, noise, latents)  # sigma noise + (1 - sigma) latents
        pred = self.net(noisy, timesteps.float(), context, None if y is None else y.to(context.dtype))
        loss = flow_loss(pred, noisy, latents, noise, timesteps, self.objective, mask)
        return (loss if loss_weights is None else loss * loss_weights.to(loss)).mean()


class TextCache:
    """Text-encoder outputs of every training caption, computed once (kohya's
    `cache_text_encoder_outputs`): in memory, or with a folder, one file per caption there too, named
    after the caption and found again by later runs. `encoders` are the indices of the encoders
    cached (those that do not train); `fingerprint` names what computed them, so another model's
    files are never read."""

    def __init__(self, encoders: Sequence[int], folder: Path | None = None):
        self.encoders = tuple(encoders)
        self.folder = folder
        self.memory: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def _file(self, caption: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{hashlib.sha1(caption.encode('utf-8')).hexdigest()}.safetensors"

    def fill(self, captions: Sequence[str], encode: Callable[[list[str]], list[list[tuple[Tensor, Tensor]]]],
             batch_size: int = 8, write: bool = True) -> None:
        """Compute what is neither in memory nor on disk: `encode(captions)` gives, per caption, one
        (hidden, pooled) pair per cached encoder. `write`: this process writes the files."""
        todo = []
        for caption in dict.fromkeys(captions):
            if caption in self.memory:
                continue
            if self.folder is not None and self._file(caption).is_file():
                sd = read_state_dict(self._file(caption))
                self.memory[caption] = [(sd.read(f"{i}.hidden"), sd.read(f"{i}.pooled")) for i in self.encoders]
                continue
            todo.append(caption)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for caption, pairs in zip(chunk, encode(chunk), strict=True):
                pairs = [(h.detach().cpu(), p.detach().cpu()) for h, p in pairs]
                self.memory[caption] = pairs
                if self.folder is not None and write:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    tensors = {}
                    for i, (h, p) in zip(self.encoders, pairs):
                        tensors[f"{i}.hidden"], tensors[f"{i}.pooled"] = h.contiguous(), p.contiguous()
                    save_safetensors(tensors, self._file(caption), {"caption": caption})

    def batch(self, captions: Sequence[str], device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Per cached encoder, the (B, T, W) hidden states and (B, P) pooled outputs of `captions`."""
        missing = [c for c in captions if c not in self.memory]
        if missing:
            raise SdlabError(f"cache_text_encoder_outputs: no cached text for the caption {missing[0]!r}; "
                             "the captions changed since the cache was made")
        rows = [self.memory[c] for c in captions]
        return [(torch.stack([r[k][0] for r in rows]).to(device), torch.stack([r[k][1] for r in rows]).to(device))
                for k in range(len(self.encoders))]
