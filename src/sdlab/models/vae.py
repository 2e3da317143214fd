"""The Stable Diffusion autoencoder (AutoencoderKL): image <-> latent.

Mirrors the LDM code, `Encoder`, `Decoder`, `AttnBlock` in
https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/model.py
and `DiagonalGaussianDistribution` in `ldm/modules/distributions/distributions.py`.
Attribute names equal the single-file checkpoint keys after `first_stage_model.`
is stripped, so loading is `load_state_dict(strict=True, assign=True)`.

The latent scale (0.18215 for SD1/SD2, 0.13025 for SDXL) is *not* applied here:
it belongs to the model family, which knows which one to use.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.models.layers import GroupNorm32, attention


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4  # LDM's z_channels (= embed_dim in every released SD VAE)
    base_channels: int = 128  # LDM's ch: width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of level i is base_channels * channel_mult[i]
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    norm_groups: int = 32  # GroupNorm groups; must divide every width

    def __post_init__(self) -> None:
        counts = ("in_channels", "out_channels", "latent_channels", "base_channels", "num_res_blocks", "norm_groups")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"VAEConfig.channel_mult must be non-empty and positive, got {self.channel_mult}")
        for width in (self.base_channels, *(self.base_channels * m for m in self.channel_mult)):
            if width % self.norm_groups:
                raise ValueError(f"VAEConfig.norm_groups ({self.norm_groups}) must divide every width, not {width}")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.channel_mult) - 1)


# SD1.x, SD2.x and SDXL VAEs share one shape; only their weights and latent scale differ.
PRESETS: Mapping[str, VAEConfig] = MappingProxyType({"sd": VAEConfig()})


def _norm(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=1e-6)


class DiagonalGaussian:
    """The encoder's posterior: a Gaussian with diagonal covariance per latent pixel."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in LDM so exp() cannot overflow (or underflow to a zero std) in half precision.
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw `mean + std * noise`.

        Args:
            generator: source of the noise. The noise is drawn on the generator's
                device (the CPU when there is none) and then moved, so a CPU
                generator gives the same latent on every device.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        # LDM has a Dropout(0.0) here; it holds no weights and does nothing, so it is left out.
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


def _linear_to_conv_weights(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: accept q/k/v/proj_out weights stored as Linear (C, C).

    Single files hold 1x1-conv weights (C, C, 1, 1), but files converted back from
    diffusers folders sometimes keep diffusers' Linear layout. Both are the same
    numbers, so reshape instead of refusing the file.
    """
    for name in ("q", "k", "v", "proj_out"):
        key = f"{prefix}{name}.weight"
        weight = state_dict.get(key)
        if weight is not None and weight.ndim == 2:
            state_dict[key] = weight[:, :, None, None]


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        # The private hook API takes the module (with_module=True) on every torch >= 2.1;
        # the public register_load_state_dict_pre_hook is newer than that.
        self._register_load_state_dict_pre_hook(_linear_to_conv_weights, with_module=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, HW, C)
        h = attention(q, k, v, heads=1)  # SDPA's default scale is C ** -0.5, as in LDM
        h = h.transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # LDM pads only right and bottom (torch convs pad symmetrically), so the
        # checkpoint's weights expect this exact asymmetric padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _resnets(in_channels: int, out_channels: int, num_blocks: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(
        ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_blocks)
    )


class DownLevel(nn.Module):
    """One encoder resolution: resnets, then a 2x downsample (except on the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = _resnets(in_channels, out_channels, num_blocks, groups)
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class UpLevel(nn.Module):
    """One decoder resolution: resnets, then a 2x upsample (except on the highest resolution)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = _resnets(in_channels, out_channels, num_blocks, groups)
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x) if self.upsample is not None else x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(cfg.base_channels if i == 0 else widths[i - 1], widths[i], cfg.num_res_blocks, cfg.norm_groups,
                      downsample=i != last)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.norm_out = _norm(widths[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        # LDM builds the levels from the lowest resolution up but stores them so that
        # up.0 is the *highest* resolution level (same index as encoder.down.0);
        # forward therefore walks `up` in reverse. Level i takes the width of level
        # i + 1 (the one run before it) and has one resnet more than the encoder.
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, len(widths) - 1)], widths[i], cfg.num_res_blocks + 1, cfg.norm_groups,
                    upsample=i != 0)
            for i in range(len(widths))
        )
        self.norm_out = _norm(widths[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The SD VAE. Images are in [-1, 1]; latents are unscaled (the family scales them)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Encode images (B, C, H, W) in [-1, 1], H and W multiples of `downsample_factor`.

        Args:
            x: the images.

        Returns:
            The posterior over latents of shape (B, latent_channels, H / f, W / f);
            take `.mode()` for the deterministic latent or `.sample(generator)`.
        """
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Decode unscaled latents (B, latent_channels, h, w) to images (B, C, h * f, w * f), roughly in [-1, 1].

        Args:
            z: the latents (divide by the family's scale factor first).
        """
        return self.decoder(self.post_quant_conv(z))
