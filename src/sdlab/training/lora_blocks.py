"""kohya's block-wise LoRA: a rank, alpha and learning-rate weight per UNet block.

kohya's `networks/lora.py` numbers the UNet's blocks as the original (LDM) UNet lays them out:

- SD 1.x / 2.x, 25 blocks: `input_blocks.N` is block N (0, the input convolution, never gets
  LoRA), `middle_block` is 12, `output_blocks.N` is 13 + N. kohya reads the number off the
  diffusers name (`down_blocks_i_{resnets|attentions}_j` is 1 + 3i + j, `downsamplers` 3i + 3);
  that is the input block's index.
- SDXL, 23 blocks: 0 is the time and label embeddings, `input_blocks.N` is 1 + N,
  `middle_block.N` is 10 + N, `output_blocks.N` is 13 + N, 22 the output layers.

`block_dims` / `block_alphas` give the rank and alpha of the Linear and 1x1 layers per block,
`conv_block_dims` / `conv_block_alphas` those of the 3x3 convolutions (LoCon), and
`down_lr_weight` / `mid_lr_weight` / `up_lr_weight` scale the learning rate of each block's
LoRA (a list, or one of kohya's curves: `cosine`, `sine`, `linear`, `reverse_linear`, `zeros`,
with `+x` added to each value). A block whose weight is not above `block_lr_zero_threshold`
gets weight 0 and no LoRA at all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import SdlabError

# Blocks per side (input / output) and in the middle, as kohya counts them.
SIDE, MIDDLE = 12, 1
SDXL_SIDE, SDXL_MIDDLE = 9, 3
CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")

_NATIVE = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_count(sdxl: bool) -> int:
    return 1 + 2 * SDXL_SIDE + SDXL_MIDDLE + 1 if sdxl else 2 * SIDE + MIDDLE


def block_index(native_path: str, sdxl: bool) -> int | None:
    """kohya's block number of a UNet module given by its native path
    (`input_blocks.4.1.proj_in`), or None outside the numbered blocks."""
    m = _NATIVE.match(native_path)
    if m is None:
        return None
    part, n = m.group(1), int(m.group(2))
    if sdxl:
        return {"input_blocks": 1, "middle_block": 1 + SDXL_SIDE, "output_blocks": 1 + SDXL_SIDE + SDXL_MIDDLE}[part] + n
    return {"input_blocks": n, "middle_block": SIDE, "output_blocks": SIDE + MIDDLE + n}[part]


def _curve(spec: str, length: int) -> list[float]:
    name, _, base = spec.partition("+")
    try:
        offset = float(base) if base else 0.0
    except ValueError:
        raise SdlabError(f"block learning-rate weight {spec!r}: the part after '+' must be a number") from None
    ramp = [i / (length - 1) for i in range(length)]
    values = {"linear": ramp, "reverse_linear": ramp[::-1], "sine": [math.sin(math.pi * r / 2) for r in ramp],
              "cosine": [math.sin(math.pi * r / 2) for r in ramp[::-1]], "zeros": [0.0] * length}
    if name not in values:
        raise SdlabError(f"block learning-rate weight {spec!r}: give {length} numbers or one of {', '.join(CURVES)} "
                         "(optionally with +x, e.g. sine+0.5)")
    return [v + offset for v in values[name]]


def parse_numbers(spec: str | float | Sequence, kind: type = float, what: str = "value") -> tuple:
    """A list of numbers as kohya's network_args write them ("2,4,,8": an empty item is 0), or
    as TOML gives them (a list, or one number)."""
    items = spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, (int, float)) else spec
    try:
        return tuple(kind(v) if str(v).strip() else kind(0) for v in items)
    except (TypeError, ValueError):
        raise SdlabError(f"lora.{what} = {spec!r}: give a list of numbers") from None


def _weights(spec: str | Sequence[float] | None, length: int, what: str) -> list[float]:
    """One side's weights: a curve name or numbers; too short is filled with 1.0, too long cut,
    as kohya does."""
    if spec is None:
        return [1.0] * length
    if isinstance(spec, str) and "," not in spec and what != "mid_lr_weight":
        return _curve(spec.strip(), length)
    return (list(parse_numbers(spec, float, what)) + [1.0] * length)[:length]


def lr_weights(sdxl: bool, down: str | Sequence[float] | None, mid: str | Sequence[float] | None,
               up: str | Sequence[float] | None, zero_threshold: float = 0.0) -> list[float] | None:
    """kohya's `get_block_lr_weight`: the learning-rate factor of each of the `block_count` blocks,
    or None when no side is given."""
    if down is None and mid is None and up is None:
        return None
    side, middle = (SDXL_SIDE, SDXL_MIDDLE) if sdxl else (SIDE, MIDDLE)
    weights = []
    for spec, length, what in ((down, side, "down_lr_weight"), (mid, middle, "mid_lr_weight"),
                               (up, side, "up_lr_weight")):
        values = _weights(spec, length, what)
        weights += values if spec is None else [w if w > zero_threshold else 0.0 for w in values]
    return [1.0] + weights + [1.0] if sdxl else weights  # SDXL: the embeddings and the output layers


@dataclass(frozen=True)
class BlockRanks:
    """Per-block (rank, alpha) of the Linear / 1x1 layers and of the 3x3 convolutions (None: no
    LoCon), and per-block learning-rate weights (None: all 1)."""

    sdxl: bool  # kohya's SDXL numbering
    dims: tuple[int, ...]
    alphas: tuple[float, ...]
    conv_dims: tuple[int, ...] | None
    conv_alphas: tuple[float, ...] | None
    lr_weights: tuple[float, ...] | None

    def rank(self, native_path: str, conv3: bool) -> tuple[int, float]:
        """(rank, alpha) of the UNet layer at `native_path`; rank 0: no LoRA there. Layers outside
        the numbered blocks get none, as in kohya (there are none among the targets)."""
        block = block_index(native_path, self.sdxl)
        if block is None:
            return 0, 1.0
        if conv3:
            return (self.conv_dims[block], self.conv_alphas[block]) if self.conv_dims is not None else (0, 1.0)
        return self.dims[block], self.alphas[block]


def block_ranks(sdxl: bool, rank: int, alpha: float, conv_rank: int, conv_alpha: float,
                block_dims: Sequence[int] | None, block_alphas: Sequence[float] | None,
                conv_block_dims: Sequence[int] | None, conv_block_alphas: Sequence[float] | None,
                lr_weight: Sequence[float] | None) -> BlockRanks | None:
    """kohya's `get_block_dims_and_alphas` and `remove_block_dims_and_alphas`: None when neither
    block dims nor block learning rates are given (every layer at `rank` / `conv_rank`)."""
    if block_dims is None and lr_weight is None:
        if block_alphas is not None or conv_block_dims is not None or conv_block_alphas is not None:
            raise SdlabError("lora.block_alphas / conv_block_dims / conv_block_alphas need lora.block_dims "
                             "(or block learning-rate weights)")
        return None
    n = block_count(sdxl)

    def full(values, default, what: str, kind=float):
        if values is None:
            return [kind(default)] * n
        if len(values) != n:
            raise SdlabError(f"lora.{what} has {len(values)} values; this model ({'SDXL' if sdxl else 'SD 1.x/2.x'}) "
                             f"has {n} blocks in kohya's numbering")
        return [kind(v) for v in values]

    dims, alphas = full(block_dims, rank, "block_dims", int), full(block_alphas, alpha, "block_alphas")
    conv_dims = conv_alphas = None
    if conv_block_dims is not None or conv_rank:
        conv_dims = full(conv_block_dims, conv_rank, "conv_block_dims", int)
        conv_alphas = full(conv_block_alphas, conv_alpha, "conv_block_alphas")
    if lr_weight is not None:  # no learning rate, no LoRA
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_weight)]
        if conv_dims is not None:
            conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_weight)]
    return BlockRanks(sdxl, tuple(dims), tuple(alphas), None if conv_dims is None else tuple(conv_dims),
                      None if conv_alphas is None else tuple(conv_alphas),
                      None if lr_weight is None else tuple(lr_weight))
