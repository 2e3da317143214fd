"""SD3's part of the web UI's recipe: its request fields checked against the loaded family, its
infotext keys (`Shift`, `SLG ...`) written and read back. Skip-layer guidance itself is composed
in `passes.with_slg`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SdlabError

if TYPE_CHECKING:
    from ..families import Family
    from ..request import GenerationRequest

__all__ = ["check_flow_fields", "sd3_infotext", "sd3_infotext_fields"]


def check_flow_fields(req: GenerationRequest, family: Family) -> None:
    """Refuse the flow models' fields on a model they mean nothing to (an image made without them
    must not pass for one made with them), and an SLG window that is empty or out of range."""
    if not family.is_flow:
        asked = [name for name, on in (("shift", req.shift is not None), ("slg_layers", bool(req.slg_layers))) if on]
        if asked:
            names = " and ".join(asked)
            raise SdlabError(f"{names} {'is' if len(asked) == 1 else 'are'} for SD3 / SD3.5 (flow) models only and "
                             f"this model is {family.label}; leave {names} out")
        return
    if req.shift is not None and not req.shift > 0:
        raise SdlabError(f"shift must be above 0, got {req.shift}; SD3's is 3")
    if req.slg_layers and not 0.0 <= req.slg_start < req.slg_end <= 1.0:
        raise SdlabError(f"skip-layer guidance from {req.slg_start} to {req.slg_end} of the steps is no window; "
                         "give 0 <= slg_start < slg_end <= 1 (e.g. 0.01 and 0.2)")


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


def sd3_infotext_fields(params: dict[str, str]) -> dict[str, object]:
    """The request fields (the HTTP API's names) that an infotext's SD3 keys give back, for the
    server's `infotext` field; SD.Next's "Sampler shift" is read as the shift too."""
    out: dict[str, object] = {}
    shift = params.get("Shift", params.get("Sampler shift"))
    if shift not in (None, ""):
        out["shift"] = shift
    if params.get("SLG layers"):
        text = str(params["SLG layers"]).replace(" ", "").strip("[]()")
        try:
            out["slg_layers"] = [int(v) for v in text.split(",") if v]
        except ValueError:
            raise SdlabError(f"infotext: SLG layers {params['SLG layers']!r} is not a list of layer numbers such as "
                             "7,8,9") from None
        for key, name in (("SLG scale", "slg_scale"), ("SLG start", "slg_start"), ("SLG end", "slg_end")):
            if params.get(key) not in (None, ""):
                out[name] = params[key]
    return out
