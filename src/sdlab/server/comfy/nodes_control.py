"""ComfyUI's ControlNet nodes (its nodes.py) and Canny (comfy_extras/nodes_canny.py) over
sdlab's ControlNet (`controlnet.loading`, `controlnet.apply`).

A CONTROL_NET is the file; it is loaded for the model that samples, where the KSampler applies
it (`nodes._control_nets`; the pipeline keeps it loaded between prompts). ControlNetApply puts
a control on the conditioning's options as ComfyUI does (`values.ControlSpec`), chained after
any control already there; `guidance` turns them into ControlNet units on the model.
"""

from __future__ import annotations

import numpy as np
import torch

from .nodes import FLOAT, Node, NodeError
from .values import ControlRef, ControlSpec

__all__ = ["CONTROL_NODES", "canny_edges"]


class ControlNetLoader(Node):
    CATEGORY, DISPLAY_NAME = "loaders", "Load ControlNet Model"
    RETURN_TYPES = ("CONTROL_NET",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"control_net_name": [env.controlnet_names()]}}

    def run(self, rt, control_net_name):
        return (_control(rt, control_net_name),)


class DiffControlNetLoader(Node):
    CATEGORY, DISPLAY_NAME = "loaders", "Load ControlNet Model (diff)"
    RETURN_TYPES = ("CONTROL_NET",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"model": ["MODEL"], "control_net_name": [env.controlnet_names()]}}

    def run(self, rt, model, control_net_name):
        return (_control(rt, control_net_name, model),)


def _control(rt, name: str, base=None) -> ControlRef:
    """The file, checked to be a control model now (its header only); loaded where it is applied."""
    from ...controlnet import inspect_control_file
    from ...errors import SdlabError

    path = rt.env.find_controlnet(name)
    try:
        inspect_control_file(path)
    except SdlabError as e:
        raise NodeError(str(e)) from None
    return ControlRef(path, base)


def _with_control(conditioning, spec: ControlSpec, to_uncond: bool):
    return [(e, {**o, "control": tuple(o.get("control") or ()) + (spec,), "control_apply_to_uncond": to_uncond})
            for e, o in conditioning]


class ControlNetApply(Node):
    """The old one-sided apply: the negative prompt gets the control too when it has none."""

    CATEGORY, DISPLAY_NAME = "conditioning/controlnet", "Apply ControlNet (DEPRECATED)"
    DEPRECATED = True
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"conditioning": ["CONDITIONING"], "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
                             "strength": FLOAT(1.0, 0.0, 10.0, 0.01)}}

    def run(self, rt, conditioning, control_net, image, strength):
        if strength == 0:
            return (conditioning,)
        return (_with_control(conditioning, ControlSpec(control_net, image, strength), True),)


class ControlNetApplyAdvanced(Node):
    """The same control on both sides, while sigma is in the percent range; `vae` is for control
    models that read a latent hint (ComfyUI's SD3 / Flux ones), which sdlab does not load: a
    UNet ControlNet reads the image."""

    CATEGORY, DISPLAY_NAME = "conditioning/controlnet", "Apply ControlNet"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")

    @classmethod
    def inputs(cls, env):
        return {"required": {"positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                             "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
                             "strength": FLOAT(1.0, 0.0, 10.0, 0.01),
                             "start_percent": FLOAT(0.0, 0.0, 1.0, 0.001), "end_percent": FLOAT(1.0, 0.0, 1.0, 0.001)},
                "optional": {"vae": ["VAE"]}}

    def run(self, rt, positive, negative, control_net, image, strength, start_percent, end_percent, vae=None):
        if strength == 0:
            return positive, negative
        spec = ControlSpec(control_net, image, strength, start_percent, end_percent)
        return _with_control(positive, spec, False), _with_control(negative, spec, False)


def canny_edges(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Canny edges (0 / 1) of an (H, W, 3) float image in [0, 1], as kornia's `canny` finds them
    (ComfyUI's Canny node): grey by BT.601 weights, a 5x5 Gaussian of sigma 1, unnormalised Sobel
    gradients, their L2 magnitude against the thresholds, non-maximum suppression and hysteresis.
    OpenCV does the steps; the gradients go to its Canny as fixed point (1/4096)."""
    from ...controlnet.preprocess import _cv2

    cv2 = _cv2()
    grey = np.ascontiguousarray(image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    blurred = cv2.GaussianBlur(grey, (5, 5), 1.0, borderType=cv2.BORDER_REFLECT_101)
    scale = 4096.0  # |Sobel| of [0, 1] pixels is at most 4 per axis: int16 holds it
    dx = np.round(cv2.Sobel(blurred, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE) * scale)
    dy = np.round(cv2.Sobel(blurred, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE) * scale)
    edges = cv2.Canny(dx.astype(np.int16), dy.astype(np.int16), low * scale, high * scale, L2gradient=True)
    return (edges > 0).astype(np.float32)


class Canny(Node):
    CATEGORY, PYTHON_MODULE = "image/preprocessors", "comfy_extras.nodes_canny"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"image": ["IMAGE"], "low_threshold": FLOAT(0.4, 0.01, 0.99, 0.01),
                             "high_threshold": FLOAT(0.8, 0.01, 0.99, 0.01)}}

    def run(self, rt, image, low_threshold, high_threshold):
        edges = [canny_edges(img, low_threshold, high_threshold) for img in image.cpu().numpy()]
        return (torch.from_numpy(np.stack(edges))[..., None].repeat(1, 1, 1, 3),)


CONTROL_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    ControlNetLoader, DiffControlNetLoader, ControlNetApply, ControlNetApplyAdvanced, Canny)}
