"""SD3's infotext keys in the web UI's recipe (`Shift`, `SLG ...`); skip-layer guidance itself is
composed in `passes.with_slg`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..families import Family
    from ..request import GenerationRequest

__all__ = ["sd3_infotext"]


def sd3_infotext(req: GenerationRequest, family: Family) -> dict[str, object]:
    """The flow families' infotext keys: the shift when it is not the model's, and SLG's settings."""
    params: dict[str, object] = {}
    if not family.is_flow:
        return params
    if req.shift is not None and req.shift != family.flow_shift:
        params["Shift"] = req.shift
    if req.slg_layers:
        params["SLG layers"] = ",".join(str(i) for i in req.slg_layers)
        params.update({"SLG scale": req.slg_scale, "SLG start": req.slg_start, "SLG end": req.slg_end})
    return params
