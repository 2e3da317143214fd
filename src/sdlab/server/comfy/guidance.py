"""A KSampler's positive and negative CONDITIONING made into sdlab's guided denoiser, by ComfyUI's
rules (comfy/samplers.py `process_conds`, `calc_cond_batch`, read at Comfy-Org/ComfyUI e0d4ea7):

- each entry is a region (`sampling.regional`): its area (ConditioningSetArea) and strength, the
  model it runs on (the model adapter, with its ControlNets when the entry has any);
- every area of one side gets an entry of the same area on the other side, made from the
  smallest entry there that holds it (`create_cond_with_same_area_if_none`), so guidance compares
  like with like;
- ControlNetApply's control (`control_apply_to_uncond`) reaches the negative prompt's entries
  when none of them has a control of its own (`apply_empty_x_to_equal_area`);
- a control runs while `percent_to_sigma(end) <= sigma <= percent_to_sigma(start)`, its hint
  resized (nearest-exact, centre crop) to the pixels of the latent or area it conditions.

One entry per side, no area, no control: exactly `CFGDenoiser` (the same batch, the same sums).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ...controlnet.apply import ControlUnit, controlled_in
from ...model import UNetModel
from ...sampling.denoiser import Conditioning
from ...sampling.regional import Area, Region, RegionalCFG
from ...text.conditioning import EncodedPrompt
from .scaling import scale_bchw
from .values import Cond, ControlSpec, NodeError

if TYPE_CHECKING:
    from ...models.controlnet import ControlNet
    from ...sampling.denoiser import NetDenoiser

__all__ = ["guided", "with_uncond_controls", "with_opposite_areas"]


def _area(opts: dict) -> Area | None:
    a = opts.get("area")
    return None if a is None else Area(*a)


def with_opposite_areas(sides: list[Cond]) -> None:
    """ComfyUI's `create_cond_with_same_area_if_none`, in place, for every area of every side."""
    for k, side in enumerate(sides):
        for entry in list(side):
            for kk, other in enumerate(sides):
                if kk != k:
                    _same_area(other, entry)


def _inside(a: Area, b: Area) -> bool:
    return a.y >= b.y and a.x >= b.x and a.y + a.height <= b.y + b.height and a.x + a.width <= b.x + b.width


def _same_area(side: Cond, entry: tuple[EncodedPrompt, dict]) -> None:
    area = _area(entry[1])
    if area is None:
        return
    smallest = None
    for other in side:
        a = _area(other[1])
        if a is None:
            smallest = other if smallest is None else smallest
        elif _inside(area, a):
            b = None if smallest is None else _area(smallest[1])
            if smallest is None or b is None or b.height * b.width > a.height * a.width:
                smallest = other
    if smallest is None or _area(smallest[1]) == area:
        return
    # The entry's options (area, strength, control ...) with the other side's text.
    own = {k: v for k, v in entry[1].items() if k in _ENTRY_KEYS}
    side.append((smallest[0], {**{k: v for k, v in smallest[1].items() if k not in _ENTRY_KEYS}, **own}))


# What an entry of ComfyUI's conds keeps from itself when copied to the other side; the rest
# (`model_conds`: the text and SDXL's sizes) comes from the entry of that side.
_ENTRY_KEYS = ("area", "strength", "control", "control_apply_to_uncond", "set_area_to_bounds")


def with_uncond_controls(positive: Cond, negative: Cond) -> None:
    """ComfyUI's `apply_empty_x_to_equal_area` for ControlNetApply's controls, in place: when no
    negative entry without an area has a control, the controls of the positive entries (without
    an area) that asked for it go to the negative entries without one, in turn."""
    wanted = [o["control"] for _, o in positive
              if o.get("control_apply_to_uncond") and "area" not in o and o.get("control")]
    plain = [i for i, (_, o) in enumerate(negative) if "area" not in o]
    if any(negative[i][1].get("control") for i in plain) or not plain:
        return
    for n, control in enumerate(wanted):
        i = plain[n % len(plain)]
        negative[i] = (negative[i][0], {**negative[i][1], "control": control})


def _lcm_contexts(entries: list[tuple[EncodedPrompt, dict]]) -> list[EncodedPrompt]:
    """Contexts of different token counts repeated to their least common multiple (ComfyUI's
    CONDCrossAttn.concat), so that they batch together; attention over a repeated sequence is
    attention over the sequence."""
    lengths = {e.context.shape[1] for e, _ in entries}
    n = math.lcm(*lengths)
    return [EncodedPrompt(e.context.repeat(1, n // e.context.shape[1], 1), e.pooled) for e, _ in entries]


class _ControlledOnCrop:
    """The model adapter with an entry's ControlNets, each hint resized to the pixels of the crop
    it conditions (made once per crop size)."""

    def __init__(self, model: NetDenoiser, units: list[tuple[ControlNet, ControlSpec]], factor: int):
        self.model, self.units, self.factor = model, units, factor
        self._by_size: dict[tuple[int, int], NetDenoiser] = {}

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        size = tuple(x.shape[-2:])
        model = self._by_size.get(size)
        if model is None:
            sampling = self.model.sampling
            scheduled = []
            for net, spec in self.units:
                hint = scale_bchw(spec.image[:1].permute(0, 3, 1, 2).float(), "nearest-exact",
                                  size[1] * self.factor, size[0] * self.factor, "center")
                low = math.nextafter(sampling.percent_to_sigma(spec.end_percent), -math.inf)  # inclusive, as ComfyUI
                high = sampling.percent_to_sigma(spec.start_percent)
                scheduled.append((ControlUnit(net, hint, spec.strength), low, high))
            model = self._by_size[size] = controlled_in(self.model, scheduled)
        return model(x, sigma, cond)


def guided(model: NetDenoiser, positive: Cond, negative: Cond, cfg: float, latent: Tensor,
           conditioning: Callable[[EncodedPrompt, dict, bool], Conditioning],
           control_nets: Callable[[ControlSpec], ControlNet], factor: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The guided denoiser `x0 = d(x, sigma)` of a KSampler.

    Args:
        model: the model adapter.
        positive, negative: the CONDITIONING inputs.
        cfg: the guidance scale (1: no negative pass, ComfyUI's cfg 1 optimisation).
        latent: the latent being sampled (its batch and size).
        conditioning: (encoded, options, negative side) -> the net's conditioning for the batch.
        control_nets: the loaded ControlNet of a ControlNetApply.
        factor: image pixels per latent pixel (where hints are resized to).
    """
    sides = [list(positive), list(negative)]
    with_opposite_areas(sides)
    with_uncond_controls(*sides)
    skip_uncond = math.isclose(cfg, 1.0)  # ComfyUI's cfg 1 optimisation: no negative pass
    if skip_uncond:
        sides[1] = []
    contexts = iter(_lcm_contexts(sides[0] + sides[1]))
    models: dict[tuple, Any] = {(): model}
    regions: list[list[Region]] = [[], []]
    for s, side in enumerate(sides):
        for _, opts in side:
            encoded = next(contexts)
            controls = tuple(opts.get("control") or ())
            if controls not in models:
                if not isinstance(model, UNetModel):
                    raise NodeError("ControlNets apply to UNet models (SD 1.x, 2.x, SDXL); this model is not one")
                units = []
                for spec in controls:
                    if spec.image.shape[0] != 1:
                        raise NodeError(f"the control image is a batch of {spec.image.shape[0]}; give one image "
                                        "per ControlNet")
                    units.append((control_nets(spec), spec))
                models[controls] = _ControlledOnCrop(model, units, factor)
            regions[s].append(Region(models[controls], conditioning(encoded, opts, s == 1),
                                     float(opts.get("strength", 1.0)), _area(opts)))
    return RegionalCFG(regions[0], regions[1], 1.0 if skip_uncond else cfg)
