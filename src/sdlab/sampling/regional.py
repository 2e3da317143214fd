"""Guidance over several conditionings per side, each on a rectangle of the latent with a
strength (area conditioning, "regional prompts"), blended per pixel: the rule of ComfyUI's
`calc_cond_batch` / `get_area_and_mult` (comfy/samplers.py, read at Comfy-Org/ComfyUI e0d4ea7).

For each side (prompt, negative prompt) every region's conditional denoiser runs on its crop of
x; its x0 is weighted by the region's strength, ramped down over up to 8 latent pixels at each
edge of the area that is not an edge of the image, and the side's x0 is the weighted sum over
the weight sum (plus 1e-37, so pixels no region covers come out 0). Classifier-free guidance
then mixes the two sides as `CFGDenoiser` does. A region without an area covers the latent with
weight `strength`, so one such region per side is plain CFG.

Regions of both sides that share a crop, a model and conditioning shapes run as one batch, the
negative prompt's first (as `CFGDenoiser` batches them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sdlab.sampling.denoiser import ConditionalDenoiser, Conditioning

__all__ = ["Area", "Region", "RegionalCFG", "region_weight"]

FEATHER = 8  # ComfyUI's `fuzz`: the widest ramp at an inner edge of an area, in latent pixels


@dataclass(frozen=True)
class Area:
    """A rectangle of the latent in latent pixels, ComfyUI's (height, width, y, x) order."""

    height: int
    width: int
    y: int
    x: int

    def clipped(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(y, x, h, w) inside a latent of `height` x `width`; h or w is 0 or less when the area
        lies outside it."""
        return self.y, self.x, min(height - self.y, self.height), min(width - self.x, self.width)


@dataclass(frozen=True)
class Region:
    """One conditioning of a side: what the model sees, where, and how much it counts."""

    model: ConditionalDenoiser  # (x, sigma, cond) -> x0 on the region's crop
    cond: Conditioning  # for a batch of one latent
    strength: float = 1.0
    area: Area | None = None  # None: the whole latent


def region_weight(area: Area | None, strength: float, height: int, width: int) -> Tensor:
    """The (h, w) weight of a region's x0 on its crop (`get_area_and_mult` without a mask): the
    strength, times (t + 1) / r on the t-th row / column from an area edge that is not the image's
    edge, r = min(8, side // 4)."""
    if area is None:
        return torch.full((height, width), float(strength))
    y, x, h, w = area.clipped(height, width)
    mult = torch.full((h, w), float(strength))
    for axis, start, size, full in ((0, y, h, height), (1, x, w, width)):
        ramp = min(FEATHER, size // 4)
        for t in range(ramp):
            factor = (t + 1) / ramp
            if start != 0:
                mult.narrow(axis, t, 1).mul_(factor)
            if start + size < full:
                mult.narrow(axis, size - 1 - t, 1).mul_(factor)
    return mult


def _crop(cond: Conditioning, box: tuple[int, int, int, int] | None) -> Conditioning:
    """The conditioning of a crop: only the inpainting channels are spatial."""
    if box is None or cond.concat is None:
        return cond
    y, x, h, w = box
    return replace(cond, concat=cond.concat[..., y:y + h, x:x + w])


class RegionalCFG:
    """`x0 = guided(x, sigma)` over regions of the prompt and of the negative prompt.

    Args:
        cond: the prompt's regions.
        uncond: the negative prompt's regions; empty when `scale == 1` (no negative pass).
        scale: the guidance scale.
    """

    def __init__(self, cond: Sequence[Region], uncond: Sequence[Region], scale: float):
        if not cond:
            raise ValueError("guidance needs at least one region for the prompt")
        if not uncond and scale != 1.0:
            raise ValueError("the negative prompt's regions are needed unless scale == 1")
        self.cond, self.uncond, self.scale = tuple(cond), tuple(uncond), float(scale)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        sides = [self.uncond, self.cond] if self.uncond else [self.cond]
        outs = [torch.zeros_like(x) for _ in sides]
        counts = [torch.full_like(x, 1e-37) for _ in sides]
        # (side, region, box) grouped into batches that one model call can take.
        groups: dict[tuple, list[tuple[int, Region, tuple | None]]] = {}
        for s, regions in enumerate(sides):
            for r in regions:
                box = None if r.area is None else r.area.clipped(height, width)
                if box is not None and (box[2] <= 0 or box[3] <= 0):
                    continue  # an area outside the latent conditions nothing
                c = r.cond
                key = (box, id(r.model), tuple(c.context.shape[1:]), c.y is None,
                       None if c.concat is None else tuple(c.concat.shape[1:]))
                groups.setdefault(key, []).append((s, r, box))
        for (box, *_), members in groups.items():
            crop = x if box is None else x[..., box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
            model = members[0][1].model
            batched = _batch([_crop(r.cond, box) for _, r, _ in members],
                             [bool(self.uncond) and s == 0 for s, _, _ in members])
            n = len(members)
            x0 = model(torch.cat([crop] * n), torch.cat([sigma] * n), batched).chunk(n)
            for (s, r, _), part in zip(members, x0):
                weight = region_weight(r.area, r.strength, height, width).to(x)
                target_out, target_count = outs[s], counts[s]
                if box is not None:
                    y, xx, h, w = box
                    target_out = target_out[..., y:y + h, xx:xx + w]
                    target_count = target_count[..., y:y + h, xx:xx + w]
                target_out += part * weight
                target_count += weight
        x0s = [o / c for o, c in zip(outs, counts)]
        if len(x0s) == 1:
            return x0s[0]
        x0_uncond, x0_cond = x0s
        return x0_uncond + self.scale * (x0_cond - x0_uncond)


def _batch(conds: Sequence[Conditioning], negative: Sequence[bool]) -> Conditioning:
    """Conditionings of equal shapes as one batch, in order; `negative` says which are the
    negative prompt's (`Conditioning.negative_rows`, as `CFGDenoiser` marks its first half)."""
    if len(conds) == 1 and not negative[0]:
        return conds[0]
    rows = [c.context.shape[0] for c in conds]
    marks = torch.tensor([neg for neg, n in zip(negative, rows) for _ in range(n)], device=conds[0].context.device)
    y = None if conds[0].y is None else torch.cat([c.y for c in conds])
    concat = None if conds[0].concat is None else torch.cat([c.concat for c in conds])
    return Conditioning(torch.cat([c.context for c in conds]), y, concat, marks)
