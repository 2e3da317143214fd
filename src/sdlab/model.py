"""The model adapter of each architecture: a loaded network with its `ModelSampling`, as the
conditional x0-denoiser the sampling step drives (`sampling.denoiser.NetDenoiser`).

An adapter owns what its network's call needs and nothing about a request's rules: the UNet's
takes SDXL's vector conditioning y (pooled text ++ embedded size numbers) and the inpainting
channels. A new architecture (SD3's MMDiT) is one more adapter here and one more
`ModelSampling` (`sampling.model_sampling`); no sampler and no recipe changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checkpoints.loader import Bundle
from .errors import SdlabError
from .families import Family, ModelConfig
from .models.mmdit import MMDiT
from .models.unet import ControlResiduals, UNet, sdxl_size_embedding
from .sampling.denoiser import Conditioning, NetDenoiser
from .sampling.model_sampling import Flow, ModelSampling, discrete
from .sampling.schedules import discrete_schedule
from .text.conditioning import EncodedPrompt

__all__ = ["MMDiTModel", "SizeConditioning", "UNetModel", "model_for", "model_sampling", "unet_model"]


def model_sampling(family: Family, zero_terminal_snr: bool | None = None, shift: float | None = None) -> ModelSampling:
    """The model sampling a family's networks were trained with; `zero_terminal_snr` None:
    as the family says (its file's `ztsnr` marker). Flow families (SD3): `Flow` with `shift`
    (None: the family's, 3.0 unless a diffusers folder's scheduler says otherwise)."""
    if family.is_flow:
        return Flow(family.flow_shift if shift is None else float(shift))
    ztsnr = family.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr
    schedule = discrete_schedule(family.beta_start, family.beta_end, zero_terminal_snr=ztsnr)
    return discrete(schedule, family.prediction)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, all (height, width) as diffusers orders them: the base model
    embeds original size, crop top-left and target size; the refiner original size, crop
    top-left and an aesthetic score (the negative prompt's own)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None  # None: the original size
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


class UNetModel(NetDenoiser):
    """The LDM UNet (SD 1.x, 2.x, SDXL and their inpainting models) as a conditional denoiser.

    The UNet casts its inputs to the dtype it computes in and answers in theirs, so it is
    driven in float32 here (`dtype`) and its output needs no cast back.
    """

    def __init__(self, unet: UNet, config: ModelConfig, sampling: ModelSampling, device: torch.device,
                 compute_dtype: torch.dtype):
        super().__init__(sampling, torch.float32)
        self.net = unet
        self.config = config
        self.device = device  # where it computes (the GPU of an offloaded model)
        self.compute_dtype = compute_dtype

    def apply(self, x_in: Tensor, t: Tensor, cond: Conditioning, control: ControlResiduals | None = None) -> Tensor:
        """`control`: ControlNet residuals for this call (`controlnet.apply.ControlledModel`)."""
        # The copy: a UNet compiled with CUDA graphs (--compile on a GPU) hands out buffers that
        # its next call overwrites, and samplers keep results across calls.
        if control is None:  # the plain call, so a compiled UNet sees the signature it was traced with
            return self.net(x_in, t, cond.context, cond.y).clone()
        return self.net(x_in, t, cond.context, cond.y, control=control).clone()

    def conditioning(self, encoded: EncodedPrompt, batch: int, sizes: SizeConditioning, negative: bool,
                     concat: Tensor | None = None) -> Conditioning:
        """The net's conditioning for a batch of `batch` images from one encoded prompt."""
        where = dict(device=self.device, dtype=self.compute_dtype)
        context = encoded.context.to(**where).expand(batch, -1, -1)
        y = self._vector(encoded.pooled, sizes, negative)
        y = None if y is None else y.to(**where).expand(batch, -1)
        return Conditioning(context=context, y=y, concat=concat)

    def _vector(self, pooled: Tensor, sizes: SizeConditioning, negative: bool) -> Tensor | None:
        """SDXL's vector conditioning y: the pooled text embedding followed by the embedded size
        numbers (original size, crop top-left, then the target size for the base model or the
        aesthetic score for the refiner), each embedded as wide as the UNet says
        (`UNetConfig.size_embed_dim`)."""
        kind = self.config.family.added_conditioning
        if kind is None:
            return None
        if kind == "sdxl":
            numbers = [*sizes.original_size, *sizes.crop_top_left, *(sizes.target_size or sizes.original_size)]
        else:
            score = sizes.negative_aesthetic_score if negative else sizes.aesthetic_score
            numbers = [*sizes.original_size, *sizes.crop_top_left, score]
        size = sdxl_size_embedding(torch.tensor([numbers], dtype=torch.float32), self.config.unet.size_embed_dim)
        return torch.cat([pooled.float().cpu(), size], dim=-1)



def unet_model(bundle: Bundle, zero_terminal_snr: bool | None = None) -> UNetModel:
    """The adapter of a loaded bundle's UNet, sampled as its family says (or on the
    zero-terminal-SNR schedule when `zero_terminal_snr` says so)."""
    return UNetModel(bundle.unet, bundle.config, model_sampling(bundle.family, zero_terminal_snr),
                     bundle.device, bundle.dtype)


class MMDiTModel(NetDenoiser):
    """SD3's MMDiT as a conditional denoiser: the net reads the text tokens (CLIP-L/G features
    zero-padded to the context width, then T5's) and the pooled vector y (CLIP-L ++ CLIP-G)."""

    def __init__(self, net: MMDiT, config: ModelConfig, sampling: ModelSampling, device: torch.device,
                 compute_dtype: torch.dtype, skip_layers: tuple[int, ...] = ()):
        super().__init__(sampling, torch.float32)
        self.net = net
        self.config = config
        self.device = device
        self.compute_dtype = compute_dtype
        self.skip_layers = skip_layers  # skip-layer guidance's pass leaves these joint blocks out

    def apply(self, x_in: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.net(x_in, t, cond.context, cond.y, skip_layers=self.skip_layers).clone()

    def conditioning(self, encoded: EncodedPrompt, batch: int, sizes: SizeConditioning | None = None,
                     negative: bool = False, concat: Tensor | None = None) -> Conditioning:
        """The net's conditioning for a batch of `batch` images from one encoded prompt. Without
        T5 the CLIP features are narrower than the context width: zero-padded to it here."""
        where = dict(device=self.device, dtype=self.compute_dtype)
        context = encoded.context
        width = self.config.unet.context_dim
        if context.shape[-1] < width:
            context = torch.nn.functional.pad(context, (0, width - context.shape[-1]))
        elif context.shape[-1] > width:
            raise SdlabError(f"the text conditioning is {context.shape[-1]} wide but the MMDiT reads {width}")
        y = encoded.pooled.to(**where).expand(batch, -1) if self.config.unet.adm_in_channels else None
        return Conditioning(context=context.to(**where).expand(batch, -1, -1), y=y, concat=concat)


def model_for(bundle: Bundle, zero_terminal_snr: bool | None = None, shift: float | None = None
              ) -> UNetModel | MMDiTModel:
    """The adapter of a loaded bundle's denoiser, by its family: the UNet's, or SD3's MMDiT's
    (sampled with `shift`, None: the family's)."""
    if bundle.family.is_flow:
        return MMDiTModel(bundle.unet, bundle.config, model_sampling(bundle.family, shift=shift), bundle.device,
                          bundle.dtype)
    return unet_model(bundle, zero_terminal_snr)
