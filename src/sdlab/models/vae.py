"""The Stable Diffusion autoencoder (AutoencoderKL): image <-> latent.

Mirrors the LDM code, `Encoder`, `Decoder`, `AttnBlock` in
https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/model.py
and `DiagonalGaussianDistribution` in `ldm/modules/distributions/distributions.py`.
Attribute names equal the single-file checkpoint keys after `first_stage_model.`
is stripped, so loading is `load_state_dict(strict=True, assign=True)`.

The latent scale (0.18215 for SD1/SD2, 0.13025 for SDXL; SD3's shift and scale,
`(z - 0.0609) * 1.5305`) is *not* applied here: it belongs to the model family, which
knows which one to use.

Large images go through `decode_tiled` / `encode_tiled`, which give the same result
as `decode` / `encode` in bounded memory; see "Tiled encode and decode" below.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.errors import SdlabError
from sdlab.models.layers import GroupNorm32, attention, memory_format_of, native_group_norm_layout


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4  # LDM's z_channels (= embed_dim in every released SD VAE)
    base_channels: int = 128  # LDM's ch: width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of level i is base_channels * channel_mult[i]
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    norm_groups: int = 32  # GroupNorm groups; must divide every width
    # The 1x1 `quant_conv` / `post_quant_conv` around the latent (LDM's, diffusers' use_quant_conv
    # and use_post_quant_conv). SD3's 16-channel VAE has neither.
    use_quant_conv: bool = True

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
# SD3 / SD3.5: the same network with 16 latent channels and no quant convs.
PRESETS: Mapping[str, VAEConfig] = MappingProxyType({
    "sd": VAEConfig(),
    "sd3": VAEConfig(latent_channels=16, use_quant_conv=False),
})


# Where the encoder's levels and their ResNet blocks are in each key layout a VAE file comes in:
# `encoder.down.{level}.block.{n}.` (the released LDM files) or `encoder.down_blocks.{level}.resnets.{n}.`
# (diffusers' AutoencoderKL). The other keys the config is read from are named alike in both.
_ENCODER_LEVELS = {"original": ("encoder.down", "block"), "diffusers": ("encoder.down_blocks", "resnets")}


def config_from_state_dict(shapes: Mapping[str, Any], prefix: str = "", layout: str = "original") -> VAEConfig:
    """Read the VAE config off a state dict's tensor shapes (norm_groups is 32 in every released VAE).

    Args:
        shapes: key -> tensor or shape, of the whole file or of the VAE alone.
        prefix: the VAE's key prefix in `shapes`, e.g. "first_stage_model.".
        layout: "original" (the released files' keys) or "diffusers" (an AutoencoderKL state dict
            without its config.json).

    Raises:
        SdlabError: no VAE under the prefix, or an incomplete one.
    """
    s = {k[len(prefix):]: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in shapes.items()
         if k.startswith(prefix)}
    if "encoder.conv_in.weight" not in s or "decoder.conv_in.weight" not in s:
        raise SdlabError(f"no VAE under the prefix {prefix!r}: 'encoder.conv_in.weight' or 'decoder.conv_in.weight' "
                         "is missing")
    try:
        base, in_channels = s["encoder.conv_in.weight"][:2]
        down, block = _ENCODER_LEVELS[layout]
        levels = len({k.split(".")[2] for k in s if k.startswith(f"{down}.")})
        blocks = len({k.split(".")[4] for k in s if k.startswith(f"{down}.0.{block}.")})
        mult = tuple(s[f"{down}.{i}.{block}.0.conv2.weight"][0] // base for i in range(levels))
        return VAEConfig(in_channels=in_channels, out_channels=s["decoder.conv_out.weight"][0],
                         latent_channels=s["decoder.conv_in.weight"][1], base_channels=base, channel_mult=mult,
                         num_res_blocks=blocks, use_quant_conv="post_quant_conv.weight" in s)
    except KeyError as e:
        raise SdlabError(f"the VAE weights are incomplete (missing {prefix}{e.args[0]})") from None
    except ValueError as e:
        raise SdlabError(f"the VAE shapes give an invalid config: {e}") from e


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


# Nearest x2 upsampling followed by a 3x3 conv reads every source pixel several times: output
# row 2i + a sees source rows i - 1 + a and i + a only, through kernel taps whose weights add up
# (a = 0: tap 0 on row i - 1, taps 1 + 2 on row i; a = 1: taps 0 + 1 on row i, tap 2 on row i + 1;
# columns alike). So the same output is four 2x2 convs of the small map, one per output phase
# (a, c): 16 multiply-adds per output pixel and channel pair instead of 36, and no 4x-sized
# upsampled copy. Equal to the plain form up to float rounding.
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
               ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))  # (phase, source row, kernel tap)


def _phase_weights(weight: Tensor) -> Tensor:
    """(O, I, 3, 3) -> (4 * O, I, 2, 2): the 2x2 kernel of each output phase, phases (a, c) major."""
    taps = torch.tensor(_PHASE_TAPS, device=weight.device)
    folded = torch.einsum("ayk,cxl,oikl->acoiyx", taps, taps, weight.float())  # (2, 2, O, I, 2, 2)
    return folded.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)


def _upsample_conv(conv: nn.Conv2d, x: Tensor, pad_top: bool = True, pad_bottom: bool = True) -> Tensor:
    """`conv(nearest_x2(x))` for a 3x3 padding-1 conv, as four phase convs (see above).

    Without `pad_top` / `pad_bottom`, x's first / last row is a halo row (a real neighbour,
    used by the tiled paths) and the output covers the rows between. A conv switched to circular
    padding (`layers.circular_padding`) wraps the small map instead: the upsampled map's wrapped
    neighbour row is the small map's, so the phases stay exact (whole maps only).
    """
    b, _, _, w = x.shape
    h = x.shape[-2] + pad_top + pad_bottom - 2  # source rows whose outputs are computed
    o = conv.out_channels
    fmt = memory_format_of(conv.weight)  # the layout the model was put in
    weight = _phase_weights(conv.weight).contiguous(memory_format=fmt)
    mode = "circular" if conv.padding_mode == "circular" else "constant"
    y = F.conv2d(F.pad(x, (1, 1, int(pad_top), int(pad_bottom)), mode=mode), weight,
                 conv.bias.repeat(4) if conv.bias is not None else None)  # (B, 4 * O, h + 1, w + 1)
    y = y.unflatten(1, (2, 2, o))  # (B, a, c, O, h + 1, w + 1)
    out = torch.empty(b, o, 2 * h, 2 * w, device=x.device, dtype=y.dtype, memory_format=fmt)
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, a::2, c::2] = y[:, a, c, :, a:a + h, c:c + w]
    return out


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), 2.25x fewer FLOPs
        return _upsample_conv(self.conv, x)


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


# ---------------------------------------------------------------------------------------------
# Tiled encode and decode
#
# Tiles decoded separately (diffusers' `enable_tiling`) disagree where they meet: every
# GroupNorm normalises each tile with that tile's own statistics, the mid block's attention
# sees only the tile, and the borders see zero padding instead of their neighbours, so the
# seams have to be blended away and the image still differs from an untiled decode.
#
# Here the network runs layer by layer over whole feature maps, but each layer is computed
# in bands of rows (a band plus one halo row on each side in, the band out), so only one
# band's temporaries exist at a time. The GroupNorm statistics of every map are summed up
# while its bands are written, and used by the next layer, and the mid block runs whole at
# latent resolution. The result equals the untiled one up to rounding: there are no seams
# to blend. Memory is the few full maps a block needs at once (at the highest resolution a
# 256-channel input and two 128-channel maps), not the dozen temporaries of an eager
# forward; for large images the maps are stored in bf16 (computation stays in the VAE's
# dtype), which halves that again.

# Above this many output pixels (all images of the batch together), the maps between layers
# are stored in bf16 when the VAE computes in fp32: 2048x2048 then needs about 4 GB, not 8.
FULL_PRECISION_MAP_PIXELS = 1536 * 1536
# Peak activation memory of an untiled SD-VAE decode in bytes per output pixel at fp32
# (measured with torch 2.13 eager on the CPU: about 3.3 KB at 512x512 and at 1024x1024; rounded up).
DECODE_BYTES_PER_PIXEL = 3700


def should_tile(height: int, width: int, available_memory: int, batch: int = 1, element_size: int = 4,
                fraction: float = 0.5) -> bool:
    """Whether an untiled decode (or encode) of `batch` height x width images would take more
    than `fraction` of `available_memory` bytes, so `decode_tiled` should be used instead.

    Args:
        height, width: image size in pixels.
        available_memory: free bytes where the VAE runs (`sdlab.device.available_memory`).
        batch: images decoded at once.
        element_size: bytes per activation value (4 for fp32, 2 for fp16 / bf16).
        fraction: the share of free memory an untiled decode may take.
    """
    need = DECODE_BYTES_PER_PIXEL * element_size / 4 * height * width * batch
    return need > fraction * available_memory


class _GroupStats:
    """Per-group mean and variance of a feature map written band by band.

    Bands are merged with Chan et al.'s pairwise update in float64, so the result is the
    whole map's statistics, as GroupNorm computes them, however many bands there are. A band
    can also be taken out again (`add(x, remove=True)`): the update is an exact identity
    for negative counts too.
    """

    def __init__(self, groups: int):
        self.groups = groups
        self.count = 0
        self.mean = self.m2 = torch.zeros(())

    def add(self, x: Tensor, remove: bool = False) -> None:
        b, c, height, width = x.shape
        n = height * width * (c // self.groups) * (-1 if remove else 1)
        # GroupNorm's own kernel is the fastest one-pass mean / variance there is (channels-last
        # included); its normalised output is thrown away. Half precision goes in as fp32 so that
        # the statistics come back in fp32.
        x = native_group_norm_layout(x.to(torch.float32 if x.dtype != torch.float64 else x.dtype))
        _, mean, rstd = torch.native_group_norm(x, None, None, b, c, height * width, self.groups, 0.0)
        mean = mean.double().view(b, self.groups)
        m2 = rstd.double().view(b, self.groups).pow(-2) * n  # (B, G); rstd = 1 / sqrt(var) with eps 0
        if self.count == 0:
            self.mean, self.m2 = mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count += n

    def normalize(self, norm: nn.GroupNorm, x: Tensor) -> Tensor:
        """`norm(x)` with these statistics in place of x's own, computed in fp32 as one
        per-channel scale and shift."""
        repeat = x.shape[1] // self.groups
        rstd = torch.rsqrt(self.m2 / self.count + norm.eps)  # (B, G)
        scale = (rstd.repeat_interleave(repeat, dim=1) * norm.weight.double())  # (B, C)
        shift = norm.bias.double() - self.mean.repeat_interleave(repeat, dim=1) * scale
        return torch.addcmul(shift.float()[:, :, None, None], x.float(), scale.float()[:, :, None, None])


def _conv_rows(conv: nn.Conv2d, a: Tensor, r0: int, r1: int, i0: int, stats: _GroupStats | None) -> Tensor:
    """Output rows r0..r1 of a 3x3 padding-1 conv, from input rows i0.. (the band with its
    halo: one real row above and below, except at the image's top and bottom edges, where the
    conv's own zero padding is the right one). The conv also computes the halo rows' outputs,
    which are dropped: cheaper than copying the band into a padded buffer. With `stats`, the
    band's output is added to them (all rows, then the halo rows taken out: no copy)."""
    out = F.conv2d(a, conv.weight, conv.bias, padding=1)
    if stats is not None:
        stats.add(out)
        for halo in (out[..., :r0 - i0, :], out[..., r1 - i0:, :]):
            if halo.shape[-2]:
                stats.add(halo, remove=True)
    return out[..., r0 - i0:r1 - i0, :]


def _bands(height: int, width: int, pixels: int) -> list[tuple[int, int]]:
    rows = max(1, pixels // width)
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


class _Streamer:
    """Runs VAE layers band by band over full maps (see the section comment)."""

    def __init__(self, groups: int, band_pixels: int, store_dtype: torch.dtype, channels_last: bool):
        self.groups = groups
        self.band_pixels = band_pixels
        self.store_dtype = store_dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def empty(self, like: Tensor, channels: int, height: int, width: int, dtype: torch.dtype | None = None) -> Tensor:
        return torch.empty(like.shape[0], channels, height, width, device=like.device,
                           dtype=dtype or self.store_dtype, memory_format=self.memory_format)

    def conv3x3(self, conv: nn.Conv2d, x: Tensor, pre: Callable[[Tensor], Tensor] | None = None,
                skip: Callable[[int, int], Tensor] | None = None, out: Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> tuple[Tensor, _GroupStats]:
        """`conv(pre(x)) + skip(rows)` for a 3x3, stride-1, padding-1 conv; `pre` must be pointwise.

        Each band reads one halo row above and below; only at the image's own top and bottom
        is the zero padding used, as in the untiled conv.
        """
        b, _, height, width = x.shape
        dtype = conv.weight.dtype
        if out is None:
            out = self.empty(x, conv.out_channels, height, width, out_dtype)
        stats = _GroupStats(self.groups) if conv.out_channels % self.groups == 0 else None
        for r0, r1 in _bands(height, width, self.band_pixels):
            i0, i1 = max(r0 - 1, 0), min(r1 + 1, height)
            a = x[..., i0:i1, :]
            a = pre(a) if pre is not None else a
            if skip is None:
                part = _conv_rows(conv, a.to(dtype), r0, r1, i0, stats)
            else:
                part = _conv_rows(conv, a.to(dtype), r0, r1, i0, None) + skip(r0, r1)
                if stats is not None:
                    stats.add(part)
            out[..., r0:r1, :] = part
        return out, stats

    def resnet(self, block: ResnetBlock, x: Tensor, stats: _GroupStats) -> tuple[Tensor, _GroupStats]:
        """ResnetBlock.forward, in two banded passes. Consumes x: when the block keeps the
        width, its output overwrites x (a band's skip reads x only at its own rows)."""
        dtype = block.conv1.weight.dtype
        h, h_stats = self.conv3x3(block.conv1, x, pre=lambda t: F.silu(stats.normalize(block.norm1, t), inplace=True))

        def skip(r0: int, r1: int) -> Tensor:
            rows = x[..., r0:r1, :].to(dtype)
            return block.nin_shortcut(rows) if block.nin_shortcut is not None else rows

        out = x if block.nin_shortcut is None else None
        return self.conv3x3(block.conv2, h, pre=lambda t: F.silu(h_stats.normalize(block.norm2, t), inplace=True),
                            skip=skip, out=out)

    def upsample(self, up: Upsample, x: Tensor) -> tuple[Tensor, _GroupStats]:
        """Upsample.forward, a band of source rows (two output rows each) at a time."""
        b, c, height, width = x.shape
        out = self.empty(x, up.conv.out_channels, 2 * height, 2 * width)
        stats = _GroupStats(self.groups)
        dtype = up.conv.weight.dtype
        for s0, s1 in _bands(height, 4 * width, self.band_pixels):  # 4 output pixels per source pixel
            band = x[..., max(s0 - 1, 0):min(s1 + 1, height), :].to(dtype)
            part = _upsample_conv(up.conv, band, pad_top=s0 == 0, pad_bottom=s1 == height)
            stats.add(part)
            out[..., 2 * s0:2 * s1, :] = part
        return out, stats

    def downsample(self, down: Downsample, x: Tensor) -> tuple[Tensor, _GroupStats]:
        """Downsample.forward: pad right and bottom by one, 3x3 conv with stride 2."""
        b, c, height, width = x.shape
        ho, wo = (height - 2) // 2 + 1, (width - 2) // 2 + 1
        out = self.empty(x, down.conv.out_channels, ho, wo)
        stats = _GroupStats(self.groups)
        for r0, r1 in _bands(ho, wo, self.band_pixels):
            end = min(2 * r1 + 1, height)  # output row i reads padded rows 2i .. 2i + 2
            a = F.pad(x[..., 2 * r0:end, :].to(down.conv.weight.dtype), (0, 1, 0, 2 * r1 + 1 - end))
            part = F.conv2d(a, down.conv.weight, down.conv.bias, stride=2)
            stats.add(part)
            out[..., r0:r1, :] = part
        return out, stats


class AutoencoderKL(nn.Module):
    """The SD VAE. Images are in [-1, 1]; latents are unscaled (the family scales them)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        else:
            # Identities keep one code path (and the modules `perf.ModelOffload` hooks); no weights.
            self.quant_conv = nn.Identity()
            self.post_quant_conv = nn.Identity()

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

    def circular(self) -> bool:
        """Whether its convolutions pad circularly (`layers.circular_padding`: seamless images)."""
        return any(isinstance(m, nn.Conv2d) and m.padding_mode == "circular" for m in self.modules())

    def decode_tiled(self, z: Tensor, tile: int = 256, store_dtype: torch.dtype | None = None) -> Tensor:
        """`decode` in bounded memory, for large images; same result up to rounding.

        Args:
            z: unscaled latents (B, latent_channels, h, w).
            tile: the layers run in full-width bands of about tile x tile output pixels.
            store_dtype: dtype of the feature maps kept between layers; default: the VAE's
                dtype, or bf16 for an fp32 VAE above FULL_PRECISION_MAP_PIXELS output pixels.
        """
        dec = self.decoder
        f = self.cfg.downsample_factor
        streamer = self._streamer(z, z.shape[-2] * z.shape[-1] * f * f, tile, store_dtype)
        # Latent resolution: small enough to run whole, so attention sees every pixel.
        h = dec.mid(dec.conv_in(self.post_quant_conv(z)))
        stats = _GroupStats(self.cfg.norm_groups)
        stats.add(h)
        h = h.to(streamer.store_dtype)
        for level in reversed(dec.up):
            for block in level.block:
                h, stats = streamer.resnet(block, h, stats)
            if level.upsample is not None:
                h, stats = streamer.upsample(level.upsample, h)
        image, _ = streamer.conv3x3(dec.conv_out, h, pre=lambda t: F.silu(stats.normalize(dec.norm_out, t), inplace=True),
                                    out_dtype=dec.conv_out.weight.dtype)
        return image

    def encode_tiled(self, x: Tensor, tile: int = 256, store_dtype: torch.dtype | None = None) -> DiagonalGaussian:
        """`encode` in bounded memory, for large images; same result up to rounding.

        Args:
            x: images (B, C, H, W) in [-1, 1], H and W multiples of `downsample_factor`.
            tile: the layers run in full-width bands of about tile x tile input pixels.
            store_dtype: as in `decode_tiled`.
        """
        enc = self.encoder
        streamer = self._streamer(x, x.shape[-2] * x.shape[-1], tile, store_dtype)
        h, stats = streamer.conv3x3(enc.conv_in, x)
        for level in enc.down:
            for block in level.block:
                h, stats = streamer.resnet(block, h, stats)
            if level.downsample is not None:
                h, stats = streamer.downsample(level.downsample, h)
        h = enc.mid(h.to(enc.conv_out.weight.dtype))  # latent resolution: whole
        return DiagonalGaussian(self.quant_conv(enc.conv_out(F.silu(enc.norm_out(h)))))

    def _streamer(self, x: Tensor, pixels: int, tile: int, store_dtype: torch.dtype | None) -> _Streamer:
        if self.circular():
            # A band's edge rows would wrap to its own other edge, not the image's.
            raise ValueError("the tiled VAE passes pad with zeros; decode / encode a VAE switched to circular "
                             "padding whole")
        dtype = self.decoder.conv_in.weight.dtype
        if store_dtype is None:
            large = pixels * x.shape[0] > FULL_PRECISION_MAP_PIXELS
            store_dtype = torch.bfloat16 if dtype == torch.float32 and large else dtype
        channels_last = memory_format_of(self.decoder.mid.block_1.conv1.weight) == torch.channels_last
        return _Streamer(self.cfg.norm_groups, tile * tile, store_dtype, channels_last)
