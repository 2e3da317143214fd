"""The T2I-Adapter: a small convolutional network that turns a hint image (edges, depth, a
sketch ...) into one feature map per UNet level, which the UNet adds to its encoder path
(`ControlResiduals.encoder`). Unlike a ControlNet it reads neither the latent, the timestep nor
the text, so its features are computed once per generation.

Three layouts, as TencentARC released them and diffusers' `T2IAdapter` names them:

- "full" (SD 1.x): pixel-unshuffle by 8, `conv_in`, then per level `num_res_blocks` ResnetBlocks,
  the first of each later level averaging 2x2 down (and a 1x1 `in_conv` where the width changes);
- "full_xl" (SDXL): the same blocks after an unshuffle by 16; level 1 changes the width without
  going down and level 2 goes down (features at 1/16, 1/16, 1/32, 1/32 of the image);
- "light": per level an "extractor" (`in_conv` to a quarter of the width, ResnetBlocks, `out_conv`).

Mirrors `Adapter` and `Adapter_light` of TencentARC/T2I-Adapter as the web UI's extension and
ComfyUI carry them (Mikubill/sd-webui-controlnet@56cec5b scripts/adapter.py,
comfyanonymous/ComfyUI comfy/t2i_adapter/adapter.py); attribute names are the original files'
keys (`conv_in`, `body.N.block1`, `body.N.in_conv`, `body.N.body.M.block1`, `body.N.out_conv`).
Only the skip-free variant (`sk=True`) exists in released files, and it is the only one here.

Which UNet block each feature joins is diffusers' rule (`UNet2DConditionModel.forward` with
`down_intrablock_additional_residuals`), which is also the extension's and ComfyUI's for the
released shapes (SD 1.x after input blocks 2, 5, 8, 11; SDXL after 3, 5, 8 and the middle):
`placement`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from sdlab.errors import SdlabError
from sdlab.models.layers import Conv2d
from sdlab.models.unet import UNetConfig

Layout = Literal["full", "full_xl", "light"]
LAYOUTS: tuple[str, ...] = ("full", "full_xl", "light")


@dataclass(frozen=True)
class T2IAdapterConfig:
    layout: Layout = "full"
    in_channels: int = 3  # the hint's channels: 3, or 1 for the sketch adapters (they read the first)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # the feature widths, one per level
    num_res_blocks: int = 2  # ResnetBlocks per level (the light adapters have 4)
    # The pixel unshuffle that opens the network (diffusers' downscale_factor): the VAE's factor
    # for "full" and "light", twice it for "full_xl", so the first feature is where the UNet takes it.
    downscale_factor: int = 8
    kernel_size: int = 1  # full layouts: of in_conv and block2 (1 in every released file)
    conv_downsample: bool = False  # full layouts: a stride-2 conv (`down_opt.op`) instead of 2x2 averaging

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if not self.channels or min(self.channels) < 1 or self.in_channels < 1 or self.num_res_blocks < 1:
            raise ValueError("channels, in_channels and num_res_blocks must be >= 1")
        if self.downscale_factor < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("downscale_factor must be >= 1 and kernel_size an odd number >= 1")
        if self.layout == "full_xl" and len(self.channels) != 4:
            raise ValueError("the full_xl layout has exactly 4 levels")
        if self.layout == "light" and any(c % 4 for c in self.channels):
            raise ValueError("the light layout's widths must be multiples of 4 (it works at a quarter of them)")

    @property
    def feature_scales(self) -> tuple[int, ...]:
        """Each feature's size as a fraction of the hint's: 1/scale."""
        f = self.downscale_factor
        if self.layout == "full_xl":
            return (f, f, 2 * f, 2 * f)
        return tuple(f * 2 ** level for level in range(len(self.channels)))


# The released shapes (TencentARC T2I-Adapter; the extension's t2i_adapter_config and
# t2i_adapter_light_config; diffusers' TencentARC/t2i-adapter-*-sdxl-1.0 configs).
PRESETS: dict[str, T2IAdapterConfig] = {
    "sd15": T2IAdapterConfig(),
    "sd15-sketch": T2IAdapterConfig(in_channels=1),
    "sd15-light": T2IAdapterConfig("light", num_res_blocks=4),
    "sdxl": T2IAdapterConfig("full_xl", downscale_factor=16),
    "sdxl-sketch": T2IAdapterConfig("full_xl", in_channels=1, downscale_factor=16),
}


# ---------------------------------------------------------------------------------------------
# Helpers


def config_from_state_dict(shapes: Mapping[str, Sequence[int]], latent_factor: int = 8,
                           levels: int | None = None) -> T2IAdapterConfig:
    """The config of a T2I-Adapter in the original layout (keys without a prefix), read off its
    shapes as the extension and ComfyUI read it.

    The unshuffle is not in the shapes, only `conv_in`'s input width (hint channels x factor^2):
    1 or 3 hint channels at twice the VAE's factor is "full_xl" (256 or 768 inputs for SDXL),
    at the VAE's factor "full" (64 or 192). The original full layout names no levels: it has
    four (every released file and every loader of them) unless `levels` says otherwise (diffusers'
    keys name them), and `num_res_blocks` = blocks / levels.

    Raises:
        SdlabError: not a T2I-Adapter, or one of a layout this network cannot express.
    """
    s = {k: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in shapes.items()}
    if "style_embedding" in s:
        raise SdlabError("a T2I style adapter (it reads CLIP image features); sdlab supports the full and light "
                         "T2I-Adapters, not the style one")
    if any(k.endswith(".skep.weight") for k in s):
        raise SdlabError("a T2I-Adapter with skip convolutions (skep), a layout no released adapter uses")
    blocks = 1 + max((int(k.split(".")[1]) for k in s if k.startswith("body.")), default=-1)
    if "conv_in.weight" in s:
        cin, c0 = s["conv_in.weight"][1], s["conv_in.weight"][0]
        levels = levels or 4
        if blocks == 0 or blocks % levels:
            raise SdlabError(f"a full T2I-Adapter with {blocks} blocks; expected {levels} levels of equal depth")
        per_level = blocks // levels
        widths = tuple(s[f"body.{level * per_level}.block1.weight"][0] for level in range(levels))
        if widths[0] != c0:
            raise SdlabError(f"a full T2I-Adapter whose conv_in gives {c0} channels and first block takes {widths[0]}")
        hint, factor, layout = _unshuffle(cin, latent_factor)
        kernel = s["body.0.block2.weight"][2]
        conv_down = any(k.endswith("down_opt.op.weight") for k in s)
        return _config(layout, hint, widths, per_level, factor, kernel, conv_down)
    if "body.0.in_conv.weight" in s:
        per_level = 1 + max((int(k.split(".")[3]) for k in s if k.startswith("body.0.body.")), default=-1)
        widths = tuple(s[f"body.{level}.out_conv.weight"][0] for level in range(blocks))
        hint, factor, layout = _unshuffle(s["body.0.in_conv.weight"][1], latent_factor)
        if layout != "full":
            raise SdlabError("a light T2I-Adapter whose input width fits no unshuffle of the model's latent")
        return _config("light", hint, widths, per_level, factor, 1, False)
    raise SdlabError("not a T2I-Adapter (no conv_in or body.0.in_conv weights)")


def _unshuffle(cin: int, latent_factor: int) -> tuple[int, int, Layout]:
    """(hint channels, unshuffle factor, full or full_xl) of conv_in's input width."""
    for factor, layout in ((2 * latent_factor, "full_xl"), (latent_factor, "full")):
        for hint in (3, 1):
            if cin == hint * factor * factor:
                return hint, factor, layout
    raise SdlabError(f"a T2I-Adapter that takes {cin} channels after its pixel unshuffle; expected 1 or 3 image "
                     f"channels unshuffled by {latent_factor} or {2 * latent_factor} "
                     f"({latent_factor ** 2 * 3} or {4 * latent_factor ** 2 * 3})")


def _config(layout: Layout, hint: int, widths: tuple[int, ...], per_level: int, factor: int, kernel: int,
            conv_down: bool) -> T2IAdapterConfig:
    try:
        return T2IAdapterConfig(layout, hint, widths, per_level, factor, kernel, conv_down)
    except ValueError as e:
        raise SdlabError(f"the T2I-Adapter's shapes give an invalid config: {e}") from None


@dataclass(frozen=True)
class Target:
    """A place in the UNet where an adapter feature joins: after input block `block` (-1: on the
    middle block's output), `width` channels at 1/`scale` of the image."""

    block: int
    width: int
    scale: int


def feature_targets(unet: UNetConfig, latent_factor: int) -> tuple[Target, ...]:
    """diffusers' rule, one target per level and the middle last: a level with attention (or the
    last level) takes its feature after its last ResBlock, before it goes down; a level without
    attention after its downsample."""
    targets = []
    block, levels = 1, len(unet.channel_mult)
    for level, (width, n_res, depth) in enumerate(zip(unet.level_channels, unet.num_res_blocks,
                                                      unet.transformer_depth)):
        last = level == levels - 1
        if depth or last:
            targets.append(Target(block + n_res - 1, width, latent_factor * 2 ** level))
        else:
            targets.append(Target(block + n_res, width, latent_factor * 2 ** (level + 1)))
        block += n_res + (0 if last else 1)
    targets.append(Target(-1, unet.level_channels[-1], latent_factor * 2 ** (levels - 1)))
    return tuple(targets)


@dataclass(frozen=True)
class Placement:
    """Where an adapter's features join a UNet: feature i after input block `blocks[i]`, and
    with `middle` the next one on the middle block's output."""

    blocks: tuple[int, ...]
    middle: bool


def placement(cfg: T2IAdapterConfig, unet: UNetConfig, latent_factor: int) -> Placement:
    """The adapter's features on `feature_targets`, in order (the extension's and ComfyUI's SD 1.x
    blocks 2, 5, 8, 11; SDXL's 3, 5, 8 and the middle). Every feature must have the width and
    size of the place it joins.

    Raises:
        ValueError: the adapter's features do not fit this UNet (one made for another family).
    """
    targets = feature_targets(unet, latent_factor)
    features = list(zip(cfg.channels, cfg.feature_scales))
    if len(features) > len(targets):
        raise ValueError(f"the adapter gives {len(features)} features and this UNet takes at most {len(targets)}")
    for i, ((width, scale), target) in enumerate(zip(features, targets)):
        if (width, scale) != (target.width, target.scale):
            raise ValueError(f"the adapter's feature {i} is {width} wide at 1/{scale} of the image where this UNet "
                             f"takes {target.width} at 1/{target.scale}")
    return Placement(tuple(t.block for t in targets[:min(len(features), len(targets) - 1)]),
                     len(features) == len(targets))


# ---------------------------------------------------------------------------------------------
# Blocks


class Downsample(nn.Module):
    """2x down: 2x2 averaging (the released adapters), or a stride-2 conv. The averaging keeps
    a half window at an odd edge (diffusers' ceil_mode), so the sizes follow the UNet's own
    stride-2 convs; the original drops it, and on even sizes (every multiple of 64 px) they agree."""

    def __init__(self, channels: int, conv: bool):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1) if conv else nn.AvgPool2d(2, 2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResnetBlock(nn.Module):
    """The full layout's block: [down], [in_conv to the new width], x + block2(relu(block1(x)))."""

    def __init__(self, c_in: int, c_out: int, down: bool, kernel_size: int, conv_downsample: bool):
        super().__init__()
        pad = kernel_size // 2
        self.down_opt = Downsample(c_in, conv_downsample) if down else None
        self.in_conv = Conv2d(c_in, c_out, kernel_size, padding=pad) if c_in != c_out else None
        self.block1 = Conv2d(c_out, c_out, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = Conv2d(c_out, c_out, kernel_size, padding=pad)

    def forward(self, x: Tensor) -> Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class LightResnetBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(self.act(self.block1(x)))


class Extractor(nn.Module):
    """The light layout's level: [down], 1x1 to a quarter of the width, ResnetBlocks, 1x1 out."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool):
        super().__init__()
        inner = c_out // 4
        self.down_opt = Downsample(c_in, False) if down else None
        self.in_conv = Conv2d(c_in, inner, 1)
        self.body = nn.Sequential(*[LightResnetBlock(inner) for _ in range(num_res_blocks)])
        self.out_conv = Conv2d(inner, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


# ---------------------------------------------------------------------------------------------
# The network


class T2IAdapter(nn.Module):
    """Hint image -> one feature map per level (`cfg.channels` wide, at 1/`cfg.feature_scales`)."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        cin = cfg.in_channels * cfg.downscale_factor ** 2
        ch = cfg.channels
        if cfg.layout == "light":
            self.conv_in = None
            self.body = nn.ModuleList([Extractor(cin if i == 0 else ch[i - 1], ch[i], cfg.num_res_blocks, i > 0)
                                       for i in range(len(ch))])
            return
        self.conv_in = Conv2d(cin, ch[0], 3, padding=1)
        # Which levels go down on entering (the extension's downsample_layers): every later
        # level in "full"; only level 2 in "full_xl", whose level 1 changes width in place.
        down = {2} if cfg.layout == "full_xl" else set(range(1, len(ch)))
        blocks = []
        for level, width in enumerate(ch):
            for r in range(cfg.num_res_blocks):
                c_in = ch[level - 1] if level and r == 0 else width
                blocks.append(ResnetBlock(c_in, width, r == 0 and level in down, cfg.kernel_size,
                                          cfg.conv_downsample))
        self.body = nn.ModuleList(blocks)

    def forward(self, hint: Tensor) -> list[Tensor]:
        """The features of a hint.

        Args:
            hint: (B, in_channels, H, W) in [0, 1]; H and W multiples of `cfg.downscale_factor`.

        Returns:
            One (B, channels[i], H / feature_scales[i], W / feature_scales[i]) tensor per level.
        """
        f = self.cfg.downscale_factor
        if hint.shape[-1] % f or hint.shape[-2] % f:
            raise ValueError(f"the hint is {hint.shape[-1]}x{hint.shape[-2]}; this T2I-Adapter needs sides that are "
                             f"multiples of {f}")
        weight = next(self.parameters())
        x = self.unshuffle(hint.to(device=weight.device, dtype=weight.dtype))
        features = []
        if self.conv_in is None:
            for extractor in self.body:
                x = extractor(x)
                features.append(x)
            return features
        x = self.conv_in(x)
        per_level = self.cfg.num_res_blocks
        for level in range(len(self.cfg.channels)):
            for block in self.body[level * per_level:(level + 1) * per_level]:
                x = block(x)
            features.append(x)
        return features
