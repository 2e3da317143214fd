"""The latent-diffusion UNet of SD 1.x, SD 2.x and SDXL (base, refiner, inpainting): one class,
one config, the real configurations in `PRESETS`.

Mirrors UNetModel / SpatialTransformer of Stability-AI/generative-models
(https://github.com/Stability-AI/generative-models/blob/4e3bd79770bb3576f4e330e12a8074d03cad99c1/sgm/modules/diffusionmodules/openaimodel.py),
without the options no Stable Diffusion checkpoint uses (scale-shift norm, resblock up/down,
class embeddings other than SDXL's "sequential" one). Attribute names equal the single-file
checkpoint keys after `model.diffusion_model.`, so loading is a prefix strip.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdlab.errors import SdlabError
from sdlab.models.layers import (
    Conv2d,
    GroupNorm32,
    attention,
    autocast_dtype,
    frozen_geglu_feed_forward,
    geglu,
    group_norm_silu,
    memory_format_of,
    pixels_to_tokens,
    recomputed_for_backward,
    timestep_embedding,
    tokens_to_pixels,
    upsample_nearest_2x,
    without_autocast,
)
from sdlab.models.storage import compute_dtype


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting: noisy latent (4), mask (1), masked-image latent (4)
    out_channels: int = 4
    model_channels: int = 320  # width of level 0; the time embedding is 4x this
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level, in units of model_channels
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)  # ResBlocks per level going down (one more going up)
    # transformer blocks in the SpatialTransformer after each ResBlock of a level; 0 = no attention there
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    # 0 = the middle block is a single ResBlock (the layout of SSD-1B / Segmind Vega, which ComfyUI
    # calls -1 and diffusers "UNetMidBlock2D"); otherwise ResBlock, SpatialTransformer, ResBlock.
    transformer_depth_middle: int = 1
    num_heads: int | None = 8  # fixed head count at every width (SD 1.x) ...
    num_head_channels: int | None = None  # ... or fixed head width (SD 2.x, SDXL: 64); exactly one is set
    context_dim: int = 768  # width of the text-encoder tokens that cross-attention reads
    use_linear_in_transformer: bool = False  # proj_in / proj_out are Linear (SD 2.x, SDXL), not 1x1 convs
    adm_in_channels: int | None = None  # width of SDXL's vector conditioning y (pooled text + size embeddings)
    # Width of the sinusoidal embedding of each number in y (sizes, crop, aesthetic score): SGM's
    # ConcatTimestepEmbedderND `outdim`, diffusers' `addition_time_embed_dim`. 256 in the released
    # SDXL models; other widths are real (the tiny SDXL test pipelines have 8), and y is
    # adm_in_channels = pooled text width + numbers * this. Unused without adm_in_channels.
    size_embed_dim: int = 256
    norm_groups: int = 32

    def __post_init__(self) -> None:
        # Configs read back from JSON (checkpoint metadata) carry lists; keep the dataclass hashable.
        for name in ("channel_mult", "num_res_blocks", "transformer_depth"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        levels = len(self.channel_mult)
        if levels == 0:
            raise ValueError("channel_mult must name at least one level")
        if len(self.num_res_blocks) != levels or len(self.transformer_depth) != levels:
            raise ValueError(f"num_res_blocks {self.num_res_blocks} and transformer_depth {self.transformer_depth} "
                             f"must have one entry per level of channel_mult {self.channel_mult}")
        if min(self.channel_mult) < 1 or min(self.num_res_blocks) < 1:
            raise ValueError("channel_mult and num_res_blocks entries must be >= 1")
        if min(self.transformer_depth) < 0 or self.transformer_depth_middle < 0:
            raise ValueError("transformer depths must be >= 0")
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("exactly one of num_heads and num_head_channels must be set")
        if min(self.in_channels, self.out_channels, self.model_channels, self.context_dim, self.norm_groups) < 1:
            raise ValueError("in_channels, out_channels, model_channels, context_dim and norm_groups must be >= 1")
        if self.adm_in_channels is not None and self.adm_in_channels < 1:
            raise ValueError("adm_in_channels must be >= 1 or None")
        if self.size_embed_dim < 1:
            raise ValueError("size_embed_dim must be >= 1")
        attended = [w for w, d in zip(self.level_channels, self.transformer_depth) if d]
        if self.transformer_depth_middle:
            attended.append(self.level_channels[-1])
        for width in self.level_channels:
            if width % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} must divide every level width, not {width}")
        for width in attended:
            split = self.num_heads or self.num_head_channels
            if width % split:
                raise ValueError(f"num_heads / num_head_channels {split} must divide the attention width {width}")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def heads(self, channels: int) -> int:
        """Number of attention heads at a width (SGM: num_heads, or channels // num_head_channels)."""
        return self.num_heads if self.num_heads is not None else channels // self.num_head_channels


# The released configurations, checked against the original yaml files (CompVis v1-inference,
# Stability-AI/stablediffusion v2-inference / v2-inpainting-inference, generative-models
# sd_xl_base / sd_xl_refiner). SD 2.x 512 and 768-v share one UNet; the prediction type is the family's.
# SDXL base lists transformer_depth [1, 2, 10] with attention_resolutions [4, 2]: level 0 has none.
PRESETS: dict[str, UNetConfig] = {
    "sd15": UNetConfig(),
    "sd15-inpaint": UNetConfig(in_channels=9),
    "sd21": UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
    "sd21-inpaint": UNetConfig(in_channels=9, num_heads=None, num_head_channels=64, context_dim=1024,
                               use_linear_in_transformer=True),
    "sdxl": UNetConfig(channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), transformer_depth=(0, 2, 10),
                       transformer_depth_middle=10, num_heads=None, num_head_channels=64, context_dim=2048,
                       use_linear_in_transformer=True, adm_in_channels=2816),
    # diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the SDXL base UNet with the 9 inpainting inputs.
    "sdxl-inpaint": UNetConfig(in_channels=9, channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2),
                               transformer_depth=(0, 2, 10), transformer_depth_middle=10, num_heads=None,
                               num_head_channels=64, context_dim=2048, use_linear_in_transformer=True,
                               adm_in_channels=2816),
    "sdxl-refiner": UNetConfig(model_channels=384, transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
                               num_heads=None, num_head_channels=64, context_dim=1280,
                               use_linear_in_transformer=True, adm_in_channels=2560),
}


@dataclass(frozen=True)
class ControlResiduals:
    """What ControlNets add to the UNet (cldm's ControlledUnetModel): one tensor per input block,
    added to that block's output where the up path takes it as a skip (the down path itself is
    unchanged), and one added to the middle block's output. T2I-Adapters add theirs to the down
    path itself (`encoder`: after input block i, so every later block and that skip see it).

    `skips[i]` has the shape of `input_blocks[i]`'s output; `middle` the middle block's. Several
    ControlNets are summed (`a + b`); `scaled` applies a unit's weight (or soft weights) to the
    skips and the middle. Empty `skips` / None `middle` / None entries of `encoder`: nothing there.
    """

    skips: tuple[Tensor, ...]
    middle: Tensor | None
    encoder: tuple[Tensor | None, ...] = ()  # T2I-Adapter features, one entry per input block

    def __add__(self, other: "ControlResiduals") -> "ControlResiduals":
        if self.skips and other.skips and len(self.skips) != len(other.skips):
            raise ValueError(f"cannot add residuals for {len(self.skips)} and {len(other.skips)} skips")
        skips = tuple(a + b for a, b in zip(self.skips, other.skips)) if self.skips and other.skips else \
            self.skips or other.skips
        width = max(len(self.encoder), len(other.encoder))
        mine, theirs = (tuple(e) + (None,) * (width - len(e)) for e in (self.encoder, other.encoder))
        return ControlResiduals(skips, _sum(self.middle, other.middle),
                                tuple(_sum(a, b) for a, b in zip(mine, theirs)))

    def scaled(self, weights: float | Sequence[float]) -> "ControlResiduals":
        """Every residual times one weight, or skip i times weights[i] and the middle times
        weights[-1] (len(skips) + 1 weights, the order of the original's 13 control scales)."""
        if isinstance(weights, (int, float)):
            weights = [float(weights)] * (len(self.skips) + 1)
        if len(weights) != len(self.skips) + 1:
            raise ValueError(f"{len(weights)} weights for {len(self.skips)} skips and the middle")
        return ControlResiduals(tuple(t * w for t, w in zip(self.skips, weights)),
                                None if self.middle is None else self.middle * weights[-1], self.encoder)


def _sum(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


# ---------------------------------------------------------------------------------------------
# Helpers


def sdxl_size_embedding(time_ids: Tensor, dim: int) -> Tensor:
    """Embed SDXL's micro-conditioning numbers, the size part of the vector conditioning y.

    Args:
        time_ids: (B, N) floats. SDXL base: original (h, w), crop (top, left), target (h, w), N = 6;
            the refiner: original (h, w), crop (top, left), aesthetic score, N = 5.
        dim: embedding width per number, the UNet's `cfg.size_embed_dim` (256 in the released
            SDXL models; no default, since a model with another width fails only at the UNet's
            first Linear).

    Returns:
        (B, N * dim) float32; SDXL's y is `torch.cat([pooled_text, this], dim=-1)` (2816 / 2560 wide).
    """
    b, n = time_ids.shape
    return timestep_embedding(time_ids.flatten(), dim).reshape(b, n * dim)  # (B, N*dim)


def _transformer_depth(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    depth = 0
    while f"{prefix}transformer_blocks.{depth}.norm1.weight" in shapes:
        depth += 1
    return depth


def down_path(s: Mapping[str, Sequence[int]], what: str) -> tuple[list[int], list[list[int]], int]:
    """Walk the down path (`input_blocks`) of a UNet or of a ControlNet's copy of it, keys without
    prefix: a Downsample (`op`) closes a level; each ResBlock's output width gives the level's
    multiplier, its SpatialTransformer (if any) the block's depth. Returns the multipliers, the
    depths of each level's blocks and the number of input blocks. `what` names the network in errors."""
    model_channels = s["input_blocks.0.0.weight"][0]
    channel_mult: list[int] = []
    depths: list[list[int]] = [[]]
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in s:
            depths.append([])
        elif f"input_blocks.{i}.0.in_layers.0.weight" in s:
            width = s[f"input_blocks.{i}.0.out_layers.3.weight"][0]
            if len(depths[-1]) == 0:
                channel_mult.append(width // model_channels)
            elif width != model_channels * channel_mult[-1]:
                raise SdlabError(f"{what} level {len(channel_mult) - 1} changes width inside the level; "
                                 "this layout is not supported")
            depth = _transformer_depth(s, f"input_blocks.{i}.1.")
            if depth == 0 and f"input_blocks.{i}.1.proj_in.weight" in s:
                raise SdlabError(f"{what} input block {i} has a SpatialTransformer without transformer blocks; "
                                 "this layout is not supported")
            depths[-1].append(depth)
        else:
            break
        i += 1
    if not all(depths) or len(depths) != len(channel_mult):
        raise SdlabError(f"the {what} has a level without ResBlocks (a truncated or damaged file?)")
    return channel_mult, depths, i


def middle_path(s: Mapping[str, Sequence[int]], what: str) -> tuple[int, bool]:
    """The middle block's transformer depth, and whether it has a SpatialTransformer at all (SDXL's
    small ControlNet keeps one with no blocks); keys without prefix, `what` names the network."""
    if "middle_block.1.proj_in.weight" in s:
        return _transformer_depth(s, "middle_block.1."), True
    if "middle_block.0.in_layers.0.weight" in s and not any(k.startswith("middle_block.2.") for k in s):
        return 0, False
    raise SdlabError(f"the {what}'s middle block is neither ResBlock-SpatialTransformer-ResBlock nor a single "
                     "ResBlock; this layout is not supported")


def config_from_state_dict(shapes: Mapping[str, Sequence[int]], *, num_heads: int | None = None,
                           num_head_channels: int | None = None, prefix: str = "") -> UNetConfig:
    """Read the UNet config off a state dict's tensor shapes (ComfyUI's `detect_unet_config` idea).

    Heads cannot be read from shapes, so the family passes exactly one of `num_heads` (SD 1.x: 8)
    and `num_head_channels` (SD 2.x, SDXL: 64). norm_groups is always 32 in real checkpoints.

    Args:
        shapes: key -> shape (tensors, `torch.Size` or tuples all work) of the whole file or the UNet.
        num_heads: fixed head count, or None.
        num_head_channels: fixed head width, or None.
        prefix: the UNet's key prefix in `shapes`, e.g. "model.diffusion_model.".

    Raises:
        SdlabError: the state dict holds no UNet, or one whose layout this UNet cannot express.
    """
    s = {k[len(prefix):]: tuple(v.shape if isinstance(v, Tensor) else v)
         for k, v in shapes.items() if k.startswith(prefix)}
    if "input_blocks.0.0.weight" not in s or "out.2.weight" not in s:
        raise SdlabError(f"no LDM UNet under the prefix {prefix!r}: 'input_blocks.0.0.weight' or 'out.2.weight' "
                         "is missing; check that the file is a Stable Diffusion checkpoint")
    model_channels, in_channels = s["input_blocks.0.0.weight"][:2]
    channel_mult, depths, _ = down_path(s, "UNet")
    num_res_blocks = [len(d) for d in depths]
    transformer_depth = [d[0] for d in depths]

    # The up path must use the same depth in every block of a level (not so in SSD-1B / Vega,
    # which distil blocks away individually).
    o = 0
    for level in reversed(range(len(channel_mult))):
        for _ in range(num_res_blocks[level] + 1):
            depths[level].append(_transformer_depth(s, f"output_blocks.{o}.1."))
            o += 1
    for level, d in enumerate(depths):
        if len(set(d)) != 1:
            raise SdlabError(f"UNet level {level} has transformer depths {d} that differ from block to block "
                             "(a distilled UNet such as SSD-1B); this layout is not supported")

    transformer_depth_middle, _ = middle_path(s, "UNet")

    extra = {}
    attn2 = next((k for k in s if k.endswith("attn2.to_k.weight")), None)
    if attn2 is not None:
        extra["context_dim"] = s[attn2][1]
        proj_in = attn2.split("transformer_blocks.")[0] + "proj_in.weight"
        extra["use_linear_in_transformer"] = len(s[proj_in]) == 2
    if "label_emb.0.0.weight" in s:
        extra["adm_in_channels"] = s["label_emb.0.0.weight"][1]
    try:
        return UNetConfig(in_channels=in_channels, out_channels=s["out.2.weight"][0], model_channels=model_channels,
                          channel_mult=tuple(channel_mult), num_res_blocks=tuple(num_res_blocks),
                          transformer_depth=tuple(transformer_depth), transformer_depth_middle=transformer_depth_middle,
                          num_heads=num_heads, num_head_channels=num_head_channels, **extra)
    except ValueError as e:
        raise SdlabError(f"the UNet shapes give an invalid config: {e}") from e


# ---------------------------------------------------------------------------------------------
# Blocks


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between, plus a (1x1 if needed) skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(),
            nn.Identity(),  # the original's Dropout: p = 0 in every SD config; keeps out_layers.3 aligned
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # Zero-initialised as in the original, so an untrained block starts as its skip path.
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # norm + SiLU as one op (`group_norm_silu`) rather than the Sequentials, which stay for the keys.
        h = self.in_layers[2](group_norm_silu(x, self.in_layers[0]))
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers[3](group_norm_silu(h, self.out_layers[0]))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        # Upsampling to the skip's size (not a plain x2) lets latents of any size through, e.g.
        # 9 -> 5 -> 9 where x2 would give 10; for even sizes the two are the same.
        if x.device.type == "cpu" and (size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3])):
            x = upsample_nearest_2x(x)
        elif size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x over context (over x itself when context is None)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_channels: int):
        super().__init__()
        inner = heads * head_channels
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Identity())  # [1] was Dropout(0)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        return geglu(self.proj(x))


class FeedForward(nn.Module):
    # On the CPU without gradients the tokens go through in slices whose GEGLU intermediate stays
    # under this size. Whole, at 512 px and batch 2 it is 84 MB in fp32 (and two 42 MB halves):
    # past glibc's 32 MB mmap ceiling, so every call maps fresh pages and the kernel zeroes them as
    # the GEMM, gelu and mul first touch them: 0.7 s of a 5.6 s fp32 SD 1.5 step on a 2-core CPU.
    # Slices are served from memory freed by the previous ones, and the peak is smaller too. GPUs
    # reuse blocks through their caching allocator, and there one large GEMM beats several.
    CHUNK_BYTES = 16 * 2**20
    # Training on the CPU with both layers frozen (a LoRA on the attention only, as diffusers'
    # scripts train), blocks this narrow keep only their input for backward and compute the GEGLU
    # projection again there (`frozen_geglu_feed_forward`): the projection is 8x the input's size
    # and, per byte saved, cheapest to recompute where the blocks are narrow. At SD 1.x's 64x64
    # level (320 channels, 512 px) that is 0.18 GiB less peak memory for 1% more step time; all
    # levels would save 0.35 GiB for 5% more.
    RECOMPUTE_MAX_DIM = 320
    # There the slices are smaller, so that the intermediates of each (its projection, 8x the
    # input slice, and that one's gradient) fit in memory the 64x64 level's activations leave free
    # (5 MB each at 512 px) instead of growing the heap: SD 1.5, 512 px, about 0.03 GiB lower
    # step peak (two pairs of runs) for 5 ms more per feed-forward.
    RECOMPUTE_CHUNK_BYTES = 4 * 2**20
    # On a GPU every level recomputes, whole: there the projection's GEMM takes microseconds of a
    # step that kernel launches dominate, and proj(x) kept at every level is over a quarter of what
    # a LoRA step keeps (SD 1.5, 256 px, bf16 autocast, counted on the CPU: 135 MiB instead of 97).
    # With the norms below, an H200's SD 1.5 LoRA step at 512 px in mixed bf16 peaked at 2.06
    # instead of 2.44 GiB, and ran faster (0.13-0.14 s instead of 0.16 s).

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))  # [1] was Dropout

    def forward(self, x: Tensor) -> Tensor:
        proj = self.net[0].proj
        rows = x.numel() // x.shape[-1]
        row_bytes = proj.out_features * x.element_size()  # of the GEGLU intermediate
        chunk = max(64, self.CHUNK_BYTES // row_bytes)
        if x.device.type != "cpu" or x.shape[-1] <= self.RECOMPUTE_MAX_DIM:
            slice_rows = max(64, self.RECOMPUTE_CHUNK_BYTES // row_bytes) if x.device.type == "cpu" else max(1, rows)
            lean = frozen_geglu_feed_forward(x, proj, self.net[2], slice_rows)
            if lean is not None:
                return lean
        if torch.is_grad_enabled() or x.device.type != "cpu" or rows <= chunk:
            return self.net(x)
        flat = x.reshape(rows, x.shape[-1])
        outs = []
        for part in flat.split(chunk):
            # The modules are called (not their weights), so hooks on them (training LoRAs drawing
            # validation images) still run.
            h, gate = proj(part).chunk(2, dim=-1)
            outs.append(self.net[2](h.mul_(torch.ops.aten.gelu_(gate))))
        return torch.cat(outs).view(*x.shape[:-1], -1)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_channels: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_channels)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_channels)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + _after_norm(self.attn1, self.norm1, x)
        x = x + _after_norm(self.attn2, self.norm2, x, context)
        return x + _after_norm(self.ff, self.norm3, x)


def _after_norm(layer: nn.Module, norm: nn.LayerNorm, x: Tensor, *args) -> Tensor:
    """`layer(norm(x), *args)`. Backward keeps the norm's input already, so a layer that would keep
    its output too (a LoRA, the lean feed-forward) gets the norm computed again there instead."""
    h = _norm_for_linears(norm, x)
    with recomputed_for_backward(h, lambda: _norm_for_linears(norm, x)):
        return layer(h, *args)


def _norm_for_linears(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """`norm(x)` for Linears to read: under autocast, in the autocast dtype.

    CUDA's autocast runs LayerNorm in fp32: it keeps an fp32 copy of x for backward, and each
    Linear that reads the output casts it again, a trainable one (a LoRA's down projection) keeping
    its cast too: 60% more activations in an SD 1.5 LoRA step (256 px, bf16, CUDA's autocast rules
    counted on the CPU: 156 MiB instead of 97). Where x and the norm's weights already have the
    autocast dtype the norm runs in it (PyTorch's kernels accumulate in fp32 and round the output
    once) and keeps x itself; otherwise (fp32 weights being fine-tuned) its output is cast once."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return norm(x)
    if x.dtype == dtype and all(p.dtype == dtype for p in norm.parameters()):
        with without_autocast(x.device.type):
            return norm(x)
    return norm(x).to(dtype)


class SpatialTransformer(nn.Module):
    """Runs transformer blocks over the pixels of a feature map, as a residual branch."""

    def __init__(self, channels: int, heads: int, head_channels: int, depth: int, context_dim: int,
                 use_linear: bool, groups: int):
        super().__init__()
        inner = heads * head_channels
        self.use_linear = use_linear
        # eps 1e-6 as the original's Normalize(); computed in fp32 here, which only adds precision.
        self.norm = GroupNorm32(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_channels, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)  # zero-initialised as in the original
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        # (B, HW, C), contiguous: a transposed view would be copied by each of the three
        # LayerNorms per block (and again in their backward) and read strided by the residual adds.
        if self.use_linear:
            x = self.proj_in(x.flatten(2).transpose(1, 2).contiguous())
        else:
            x = pixels_to_tokens(x, self.proj_in)
        for block in self.transformer_blocks:
            x = block(x, context)
        # (B, C, H, W) in the layout the block was given: the bare view is channels-last, which an
        # NCHW model would read strided in the residual add and hand on to the next convolutions
        # and norms; a channels-last model (perf.prepare_for_inference) takes it as it is.
        if self.use_linear:
            x = self.proj_out(x)
            x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=memory_format_of(x_in))
        else:
            x = tokens_to_pixels(x, self.proj_out, (h, w), memory_format_of(x_in))
        return x + x_in


class TimestepEmbedSequential(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: hands each layer what it needs."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, out_size: Sequence[int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# The network


def embedding_layers(model_channels: int, adm_in_channels: int | None) -> tuple[nn.Module, nn.Module | None]:
    """The timestep MLP (`time_embed`) and SDXL's vector-conditioning MLP (`label_emb`, None without
    adm), as the UNet and its ControlNet copy both hold them."""
    emb = 4 * model_channels
    time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
    # SGM's "sequential" adm: the MLP sits one Sequential deeper, hence label_emb.0.0 / label_emb.0.2.
    label_emb = None
    if adm_in_channels is not None:
        label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))
    return time_embed, label_emb


def embed(time_embed: nn.Module, label_emb: nn.Module | None, timesteps: Tensor, y: Tensor | None,
          model_channels: int, dtype: torch.dtype) -> Tensor:
    """The embedding every ResBlock reads: the timesteps' (sinusoids in fp32, as fp16 cannot resolve
    cos(t * f) for t near 1000), plus SDXL's y through `label_emb`."""
    emb = time_embed(timestep_embedding(timesteps, model_channels).to(dtype))
    if label_emb is not None:
        emb = emb + label_emb(y.to(dtype))
    return emb


class UNet(nn.Module):
    """The LDM UNet: eps / v prediction from (noisy latent, timestep, text tokens[, SDXL vector y]).

    Set `gradient_checkpointing = True` to recompute each block's activations in the backward pass
    while training (less memory, about a third more compute).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb = 4 * mc

        self.time_embed, self.label_emb = embedding_layers(mc, cfg.adm_in_channels)

        levels = list(zip(cfg.level_channels, cfg.num_res_blocks, cfg.transformer_depth))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]  # width of every input block's output, consumed in reverse by the up path
        ch = mc
        for level, (width, n_res, depth) in enumerate(levels):
            for _ in range(n_res):
                layers: list[nn.Module] = [ResBlock(ch, emb, width, groups)]
                ch = width
                if depth:
                    layers.append(self._spatial_transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(levels) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, emb, ch, groups)]
        if cfg.transformer_depth_middle:
            middle += [self._spatial_transformer(ch, cfg.transformer_depth_middle), ResBlock(ch, emb, ch, groups)]
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, (width, n_res, depth) in reversed(list(enumerate(levels))):
            for i in range(n_res + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb, width, groups)]
                ch = width
                if depth:
                    layers.append(self._spatial_transformer(ch, depth))
                if level and i == n_res:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)  # zero-initialised as in the original
        nn.init.zeros_(self.out[2].bias)

    def _spatial_transformer(self, channels: int, depth: int) -> SpatialTransformer:
        heads = self.cfg.heads(channels)
        return SpatialTransformer(channels, heads, channels // heads, depth, self.cfg.context_dim,
                                  self.cfg.use_linear_in_transformer, self.cfg.norm_groups)

    def _run(self, block: TimestepEmbedSequential, h: Tensor, emb: Tensor, context: Tensor,
             out_size: Sequence[int] | None = None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, out_size, use_reentrant=False)
        return block(h, emb, context, out_size)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None, *,
                control: ControlResiduals | None = None) -> Tensor:
        """Predict the network's target (eps or v) for a batch.

        Args:
            x: (B, in_channels, H, W) noisy latents (inpainting: latent, mask, masked-image latent).
            timesteps: (B,) float training timesteps in [0, 1000); fractional values are fine.
            context: (B, T, context_dim) text-encoder tokens.
            y: (B, adm_in_channels) SDXL vector conditioning, given exactly when the config has
                adm_in_channels; see `sdxl_size_embedding`.
            control: ControlNet residuals (`models.controlnet.ControlNet`'s output), one per input
                block plus the middle; None (the default) runs the plain UNet.

        Returns:
            (B, out_channels, H, W) in x's dtype. Inputs are cast to the dtype the network computes
            in (`storage.compute_dtype`), so an fp16 network can be driven by an fp32 sampler.
        """
        if (y is None) != (self.label_emb is None):
            raise ValueError("y (SDXL's vector conditioning) must be given exactly when the config has adm_in_channels")
        dtype = compute_dtype(self)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = embed(self.time_embed, self.label_emb, timesteps, y, self.cfg.model_channels, dtype)
        context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        encoder = control.encoder if control is not None else ()
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context)
            if i < len(encoder) and encoder[i] is not None:
                if encoder[i].shape[-2:] != h.shape[-2:]:
                    raise ValueError(f"an adapter feature of size {tuple(encoder[i].shape[-2:])} for input block {i}, "
                                     f"whose output is {tuple(h.shape[-2:])}")
                h = h + encoder[i].to(dtype)  # T2I-Adapters: into the down path itself
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if control is not None:
            if control.skips and len(control.skips) != len(skips):
                raise ValueError(f"control has {len(control.skips)} skip residuals; this UNet has {len(skips)} "
                                 "input blocks (a ControlNet made for another model family?)")
            # Added to what the up path reads, as cldm's ControlledUnetModel: the encoder ran without them.
            if control.skips:
                skips = [s + c.to(dtype) for s, c in zip(skips, control.skips)]
            if control.middle is not None:
                h = h + control.middle.to(dtype)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out[2](group_norm_silu(h, self.out[0])).to(x.dtype)
