"""The ControlNet of SD 1.x, SD 2.x and SDXL: a trainable copy of the UNet's encoder that reads
a hint image (edges, depth, pose ...) and returns one residual per skip connection plus one for
the middle block, which the UNet adds (`UNet.forward(..., control=...)`).

Mirrors `ControlNet` of lllyasviel/ControlNet
(https://github.com/lllyasviel/ControlNet/blob/ed85cd1e25a5ed592f7d8178495b4483de0331bf/cldm/cldm.py)
with the UNet's own blocks (`models.unet`), so the encoder copy is the UNet's code, not a second
implementation. Attribute names equal the released files' keys after `control_model.`:
`time_embed`, `label_emb` (SDXL), `input_blocks`, `middle_block`, `input_hint_block`,
`zero_convs.N.0`, `middle_block_out.0`; loading is a prefix strip.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor, nn

from sdlab.errors import SdlabError
from sdlab.models.layers import Conv2d
from sdlab.models.storage import compute_dtype
from sdlab.models.unet import (
    PRESETS as UNET_PRESETS,
    ControlResiduals,
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    UNetConfig,
    down_path,
    embed,
    embedding_layers,
    middle_path,
)


@dataclass(frozen=True)
class ControlNetConfig:
    # The UNet whose encoder this copies: in_channels, widths, ResBlocks, attention, context and
    # adm are read from it; out_channels and the up path are unused.
    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3  # channels of the hint image (3: RGB; 4 in a few inpaint variants)
    # Widths of the hint encoder's levels: conv to [0], then per later level a conv and a stride-2
    # conv, then a zero conv to model_channels. (16, 32, 96, 256): 8x down, as the latent.
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    # The SDXL "small" ControlNet keeps a SpatialTransformer with no transformer blocks in its
    # middle (norm, proj_in, proj_out: diffusers' mid block with 0 layers); UNetConfig's depth 0
    # means a single-ResBlock middle, so this says the other thing. Needs transformer_depth_middle 0.
    middle_transformer_without_blocks: bool = False
    # Shuffle models: each residual averaged over its pixels (the extension sets it by file name).
    global_average_pooling: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint_block_channels", tuple(self.hint_block_channels))
        if self.hint_channels < 1 or not self.hint_block_channels or min(self.hint_block_channels) < 1:
            raise ValueError("hint_channels and every hint_block_channels entry must be >= 1")
        if self.middle_transformer_without_blocks and self.unet.transformer_depth_middle:
            raise ValueError("middle_transformer_without_blocks needs unet.transformer_depth_middle 0")

    @property
    def num_residuals(self) -> int:
        """Skip residuals: one per input block (12 for SD 1.x / 2.x, 9 for SDXL)."""
        levels = len(self.unet.channel_mult)
        return 1 + sum(self.unet.num_res_blocks) + levels - 1


def _sdxl_variant(depth: tuple[int, ...], middle: int, **kw) -> ControlNetConfig:
    return ControlNetConfig(replace(UNET_PRESETS["sdxl"], transformer_depth=depth, transformer_depth_middle=middle),
                            **kw)


# The released shapes (sd-webui-controlnet's controlnet_model_guess.py, ComfyUI's model_detection:
# SDXL_mid_cnet / SDXL_small_cnet; diffusers/controlnet-*-sdxl-1.0[-mid|-small]).
PRESETS: dict[str, ControlNetConfig] = {
    "sd15": ControlNetConfig(UNET_PRESETS["sd15"]),
    "sd21": ControlNetConfig(UNET_PRESETS["sd21"]),
    "sdxl": ControlNetConfig(UNET_PRESETS["sdxl"]),
    "sdxl-mid": _sdxl_variant((0, 0, 1), 1),
    "sdxl-small": _sdxl_variant((0, 0, 0), 0, middle_transformer_without_blocks=True),
}


# ---------------------------------------------------------------------------------------------
# Helpers


def config_from_state_dict(shapes: Mapping[str, Sequence[int]], *, num_heads: int | None = None,
                           num_head_channels: int | None = None, prefix: str = "") -> ControlNetConfig:
    """Read the ControlNet config off a state dict in the original layout (keys after `prefix`).

    Heads are not in the shapes: the caller passes exactly one of `num_heads` (SD 1.x: 8) and
    `num_head_channels` (SD 2.x, SDXL: 64), as for `unet.config_from_state_dict`.

    Raises:
        SdlabError: no ControlNet under the prefix, or one whose layout this network cannot express.
    """
    s = {k[len(prefix):]: tuple(v.shape if isinstance(v, Tensor) else v)
         for k, v in shapes.items() if k.startswith(prefix)}
    for key in ("input_hint_block.0.weight", "zero_convs.0.0.weight", "input_blocks.0.0.weight",
                "middle_block_out.0.weight"):
        if key not in s:
            raise SdlabError(f"no ControlNet under the prefix {prefix!r}: {key!r} is missing")

    # The hint encoder: convs at the even indices of input_hint_block; the stride-2 ones open a level.
    convs = []
    while f"input_hint_block.{2 * len(convs)}.weight" in s:
        convs.append(s[f"input_hint_block.{2 * len(convs)}.weight"])
    if len(convs) < 2 or len(convs) % 2:
        raise SdlabError(f"the ControlNet's hint encoder has {len(convs)} convolutions; expected an even number >= 2")
    hint_block_channels = (convs[0][0], *(c[0] for c in convs[2:-1:2]))

    model_channels, in_channels = s["input_blocks.0.0.weight"][:2]
    channel_mult, depths, i = down_path(s, "ControlNet")
    for level, d in enumerate(depths):
        if len(set(d)) != 1:
            raise SdlabError(f"ControlNet level {level} has transformer depths {d} that differ from block to block; "
                             "this layout is not supported")
    if any(f"zero_convs.{j}.0.weight" not in s for j in range(i)) or f"zero_convs.{i}.0.weight" in s:
        raise SdlabError(f"the ControlNet has {i} input blocks but not as many zero_convs (a damaged file?)")

    depth_middle, has_transformer = middle_path(s, "ControlNet")
    without_blocks = has_transformer and depth_middle == 0

    extra = {}
    attn2 = next((k for k in s if k.endswith("attn2.to_k.weight")), None)
    if attn2 is not None:
        extra["context_dim"] = s[attn2][1]
    proj_in = next((k for k in s if k.endswith(".proj_in.weight")), None)
    if proj_in is not None:
        extra["use_linear_in_transformer"] = len(s[proj_in]) == 2
    if "label_emb.0.0.weight" in s:
        extra["adm_in_channels"] = s["label_emb.0.0.weight"][1]
        extra.setdefault("context_dim", UNET_PRESETS["sdxl"].context_dim)  # SDXL small: no attention to read it off
    try:
        unet = UNetConfig(in_channels=in_channels, model_channels=model_channels, channel_mult=tuple(channel_mult),
                          num_res_blocks=tuple(len(d) for d in depths), transformer_depth=tuple(d[0] for d in depths),
                          transformer_depth_middle=depth_middle, num_heads=num_heads,
                          num_head_channels=num_head_channels, **extra)
        return ControlNetConfig(unet, hint_channels=s["input_hint_block.0.weight"][1],
                                hint_block_channels=hint_block_channels,
                                middle_transformer_without_blocks=without_blocks)
    except ValueError as e:
        raise SdlabError(f"the ControlNet shapes give an invalid config: {e}") from e


# ---------------------------------------------------------------------------------------------
# Blocks


def _hint_block(hint_channels: int, widths: Sequence[int], model_channels: int) -> nn.Sequential:
    """The hint encoder: SiLU between convs (the odd indices), a zero-initialised conv last."""
    layers: list[nn.Module] = [Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [Conv2d(c_in, c_in, 3, padding=1), nn.SiLU(), Conv2d(c_in, c_out, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(_zero(Conv2d(widths[-1], model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def _zero(conv: Conv2d) -> Conv2d:
    # Zero-initialised as in the original: an untrained ControlNet leaves the UNet unchanged.
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _zero_conv(channels: int) -> nn.Sequential:
    return nn.Sequential(_zero(Conv2d(channels, channels, 1)))  # a Sequential: the key is zero_convs.N.0


# ---------------------------------------------------------------------------------------------
# The network


class ControlNet(nn.Module):
    """The UNet's encoder plus a hint encoder: residuals for `UNet.forward(..., control=...)`."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        mc, groups = u.model_channels, u.norm_groups
        emb = 4 * mc

        self.time_embed, self.label_emb = embedding_layers(mc, u.adm_in_channels)
        self.input_hint_block = _hint_block(cfg.hint_channels, cfg.hint_block_channels, mc)

        # The encoder exactly as the UNet builds it, with a zero conv on each block's output.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(u.in_channels, mc, 3, padding=1))])
        self.zero_convs = nn.ModuleList([_zero_conv(mc)])
        ch = mc
        levels = list(zip(u.level_channels, u.num_res_blocks, u.transformer_depth))
        for level, (width, n_res, depth) in enumerate(levels):
            for _ in range(n_res):
                layers: list[nn.Module] = [ResBlock(ch, emb, width, groups)]
                ch = width
                if depth:
                    layers.append(self._spatial_transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.zero_convs.append(_zero_conv(ch))
            if level != len(levels) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.zero_convs.append(_zero_conv(ch))

        middle: list[nn.Module] = [ResBlock(ch, emb, ch, groups)]
        if u.transformer_depth_middle or cfg.middle_transformer_without_blocks:
            middle += [self._spatial_transformer(ch, u.transformer_depth_middle), ResBlock(ch, emb, ch, groups)]
        self.middle_block = TimestepEmbedSequential(*middle)
        self.middle_block_out = _zero_conv(ch)

    def _spatial_transformer(self, channels: int, depth: int) -> SpatialTransformer:
        u = self.cfg.unet
        heads = u.heads(channels)
        return SpatialTransformer(channels, heads, channels // heads, depth, u.context_dim,
                                  u.use_linear_in_transformer, u.norm_groups)

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor,
                y: Tensor | None = None) -> ControlResiduals:
        """The residuals for one UNet call, unscaled (a unit's weight is `ControlResiduals.scaled`).

        Args:
            x: (B, in_channels, H, W) the noisy latents the UNet gets.
            hint: (B, hint_channels, 8H, 8W) the control image, RGB in [0, 1] (inpaint hints: -1
                where masked); 8x the latent size for the standard hint encoder.
            timesteps: (B,) or scalar float training timesteps, as the UNet's.
            context: (B, T, context_dim) text-encoder tokens.
            y: (B, adm_in_channels) SDXL vector conditioning, exactly when the config has adm_in_channels.

        Returns:
            `ControlResiduals` in the network's compute dtype: one per input block, and the middle's.
        """
        if (y is None) != (self.label_emb is None):
            raise ValueError("y (SDXL's vector conditioning) must be given exactly when the config has adm_in_channels")
        dtype = compute_dtype(self)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = embed(self.time_embed, self.label_emb, timesteps, y, self.cfg.unet.model_channels, dtype)
        context = context.to(dtype)

        guided_hint = self.input_hint_block(hint.to(dtype))
        if guided_hint.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"the hint encodes to {tuple(guided_hint.shape[-2:])}, the latent is "
                             f"{tuple(x.shape[-2:])}: the hint must be 8x the latent's size")
        h = x.to(dtype)
        skips = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint  # the hint enters after the first conv, as in the original
            skips.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        middle = self.middle_block_out(h)
        if self.cfg.global_average_pooling:
            skips = [t.mean(dim=(2, 3), keepdim=True) for t in skips]
            middle = middle.mean(dim=(2, 3), keepdim=True)
        return ControlResiduals(tuple(skips), middle)
