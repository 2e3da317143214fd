"""ComfyUI's upscale-model nodes (comfy_extras/nodes_upscale_model.py) over `sdlab.upscalers`
(spandrel; `pip install "sdlab[upscale]"`): the model runs tiled as ComfyUI runs it (512-pixel
tiles, 32 of overlap, the whole image when spandrel says the model tiles itself), with sdlab's
blend of the overlaps (`upscalers.tiled_upscale`); an image within one tile is the model's own
output. The IMAGE stays float: no rounding to 8 bits between nodes."""

from __future__ import annotations

import torch

from .nodes import Node, NodeError

__all__ = ["UPSCALE_NODES"]

TILE, OVERLAP = 512, 32  # ComfyUI's (it halves the tile on running out of memory; sdlab does not)


class UpscaleModelLoader(Node):
    CATEGORY, DISPLAY_NAME = "loaders", "Load Upscale Model"
    PYTHON_MODULE = "comfy_extras.nodes_upscale_model"
    RETURN_TYPES = ("UPSCALE_MODEL",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"model_name": [env.upscale_model_names()]}}

    def run(self, rt, model_name):
        from ...errors import SdlabError
        from ...upscalers import load_upscaler_model

        try:
            model = load_upscaler_model(rt.env.find_upscale_model(model_name), rt.env.device())
        except SdlabError as e:
            raise NodeError(str(e)) from None
        if model.descriptor.input_channels != 3 or model.descriptor.output_channels != 3:
            raise NodeError(f"{model_name}: a model of {model.descriptor.input_channels} channels in and "
                            f"{model.descriptor.output_channels} out; ImageUpscaleWithModel runs RGB models")
        return (model,)


class ImageUpscaleWithModel(Node):
    CATEGORY, DISPLAY_NAME = "image/upscaling", "Upscale Image (using Model)"
    PYTHON_MODULE = "comfy_extras.nodes_upscale_model"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]}}

    def run(self, rt, upscale_model, image):
        from ...upscalers import tiled_upscale

        model, scale = upscale_model, upscale_model.scale
        out = []
        for img in image[..., :3].permute(0, 3, 1, 2).float().cpu():
            result = torch.empty(3, img.shape[1] * scale, img.shape[2] * scale)
            for y, rows in tiled_upscale(model, img, scale, tile=TILE if model.tiles else 0, overlap=OVERLAP,
                                         multiple_of=model.multiple_of, device=model.device, dtype=model.dtype,
                                         progress=lambda done, total: rt.progress(done, total)):
                result[:, y:y + rows.shape[1]] = rows
            out.append(result.clamp(0, 1).permute(1, 2, 0))
        return (torch.stack(out),)


UPSCALE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (UpscaleModelLoader, ImageUpscaleWithModel)}
