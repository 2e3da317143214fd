"""ComfyUI's SD3 nodes (comfy_extras/nodes_sd3.py; ModelSamplingSD3 from nodes_model_advanced.py)
over sdlab's SD3 support (`checkpoints.sd3`, `model.MMDiTModel`, `sampling.model_sampling.Flow`).

CheckpointLoaderSimple loads an SD3 file as any other (with its encoders, or with them found in
the models folder's text_encoders/ or clip/); TripleCLIPLoader loads the encoders from files.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .nodes import FLOAT, INT, MAX_RESOLUTION, TEXT, Node, clip_family, encode_text
from .values import ClipRef, NodeError

__all__ = ["SD3_NODES"]


class TripleCLIPLoader(Node):
    CATEGORY, DISPLAY_NAME = "advanced/loaders", "Load CLIP (Triple)"
    DESCRIPTION = "Recipes:\nsd3: clip-l, clip-g, t5"
    PYTHON_MODULE = "comfy_extras.nodes_sd3"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def inputs(cls, env):
        names = env.text_encoder_names()
        return {"required": {"clip_name1": [names], "clip_name2": [names], "clip_name3": [names]},
                "optional": {"device": [["default", "cpu"], {"advanced": True}]}}

    def run(self, rt, clip_name1, clip_name2, clip_name3, device="default"):
        from .loaders import load_sd3_text_encoders

        paths = [rt.env.find_text_encoder(n) for n in (clip_name1, clip_name2, clip_name3)]
        where = torch.device("cpu") if device == "cpu" else rt.env.device()
        runners, family = load_sd3_text_encoders(paths, where, rt.env.dtype(where))
        return (ClipRef(None, runners=tuple(runners), family=family),)


class EmptySD3LatentImage(Node):
    CATEGORY, PYTHON_MODULE = "latent/sd3", "comfy_extras.nodes_sd3"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"width": INT(1024, 16, MAX_RESOLUTION, 16), "height": INT(1024, 16, MAX_RESOLUTION, 16),
                             "batch_size": INT(1, 1, 4096)}}

    def run(self, rt, width, height, batch_size=1):
        # Zeros (ComfyUI's current node; older ones filled 0.0609, SD3's shift, which its sampler
        # then shifted to about zero anyway): an empty latent is not shifted into a model's space.
        return ({"samples": torch.zeros([batch_size, 16, height // 8, width // 8]), "downscale_ratio_spacial": 8},)


class CLIPTextEncodeSD3(Node):
    """Each of SD3's encoders its own text. `empty_padding` "none" leaves an encoder whose text is
    empty out, as ComfyUI does: no T5 tokens (the context is the CLIPs' alone), or no CLIP tokens
    when both CLIP texts are empty (T5's tokens alone, the pooled vector zeros); "empty_prompt"
    encodes the empty text. One empty CLIP text of two is encoded as the empty prompt."""

    CATEGORY, DISPLAY_NAME = "advanced/conditioning", "CLIP Text Encode (SD3)"
    PYTHON_MODULE = "comfy_extras.nodes_sd3"
    RETURN_TYPES = ("CONDITIONING",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"clip": ["CLIP"], "clip_l": TEXT, "clip_g": TEXT, "t5xxl": TEXT,
                             "empty_padding": [["none", "empty_prompt"], {"advanced": True}]}}

    def run(self, rt, clip, clip_l, clip_g, t5xxl, empty_padding):
        family = clip_family(rt, clip)
        if family.text_combine != "sd3":
            raise NodeError(f"CLIPTextEncodeSD3 needs SD3's text encoders; this CLIP is {family.label}'s "
                            "(use CLIPTextEncode)")
        by_key = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5xxl}
        keys = [slot.embedding_key for slot in family.text_encoders]
        texts = [by_key[k] for k in keys]
        none = empty_padding == "none"
        drop_t5, drop_clips = none and t5xxl == "", none and clip_l == "" and clip_g == ""
        use = [i for i, k in enumerate(keys) if not (drop_t5 if k == "t5" else drop_clips)]
        clips = [i for i, k in enumerate(keys) if k != "t5"]
        if any(i in use for i in clips):
            encoded = encode_text(rt, clip, texts, use=use)
        else:
            encoded = _without_clip(rt, clip, texts, use, clips)
        return ([(encoded, {})],)


def _without_clip(rt, clip: ClipRef, texts, use, clips):
    """ComfyUI's SD3 encoding with no CLIP tokens: T5's tokens alone (zeros when T5 is left out
    too), and a pooled vector of zeros."""
    from ...text.conditioning import EncodedPrompt

    runners = list(clip.runners) if clip.entry is None else rt.pipeline(clip.entry).text

    def zeros(runner) -> int:  # a lone CLIP's runner pads to both CLIPs' width (ZeroFilledRunner)
        return sum(getattr(runner, "zeros", (0, 0)))

    pooled = sum((runners[i].encoder.cfg.projection_dim or runners[i].encoder.cfg.width) + zeros(runners[i])
                 for i in clips)
    if use:
        context = encode_text(rt, clip, texts, use=use).context
    else:
        width = max(r.encoder.cfg.width for r in runners) if len(runners) > len(clips) else sum(
            runners[i].encoder.cfg.width + zeros(runners[i]) for i in clips)
        context = torch.zeros(1, 77, width)
    return EncodedPrompt(context, torch.zeros(1, pooled))


class ModelSamplingSD3(Node):
    CATEGORY, PYTHON_MODULE = "advanced/model", "comfy_extras.nodes_model_advanced"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def inputs(cls, env):
        return {"required": {"model": ["MODEL"], "shift": FLOAT(3.0, 0.0, 100.0, 0.01)}}

    def run(self, rt, model, shift):
        if not shift > 0:
            raise NodeError(f"shift must be above 0, got {shift}; SD3's is 3")
        return (replace(model, shift=float(shift)),)


SD3_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    TripleCLIPLoader, EmptySD3LatentImage, CLIPTextEncodeSD3, ModelSamplingSD3)}
