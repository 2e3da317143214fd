"""Model families: one entry per kind of Stable Diffusion model, and detection of
the family (and the exact network configs) from a state dict's keys and shapes.

Detection reads marker keys for the family and tensor shapes for the
hyperparameters (ComfyUI's `model_detection.py` approach), so pruned,
non-standard and tiny models load as well as the released ones. Shapes cannot
tell a few things (attention heads, GroupNorm groups); those come from the
family's rule (SD1: 8 heads; SD2/SDXL: 64 channels per head; CLIP: 64 per head;
32 groups), or exactly from the `sdlab.config` metadata of files sdlab wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

from .errors import SdlabError
from .models.clip import CLIPTextConfig
from .models.mmdit import MMDiTConfig
from .models.t5 import T5Config
from .models.unet import UNetConfig, config_from_state_dict as unet_config_from_shapes
from .models.vae import VAEConfig

Prediction = Literal["eps", "v", "flow"]
Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class TextEncoderSlot:
    """Where one text encoder lives in a single-file checkpoint and in a diffusers folder."""

    prefix: str
    layout: Literal["openai", "openclip", "t5"]
    pad_token: Literal["eos", "zero"]  # SD1's tokenizer pads with end-of-text, OpenCLIP's with 0
    diffusers_folder: str = "text_encoder"
    tokenizer_folder: str = "tokenizer"
    # Which of SDXL's two encoders this is, for the files made for it: a LoRA's `lora_te1_` /
    # `lora_te2_` modules ("te0" / "te1"; SD 1.x/2.x's only encoder is "te0") and an
    # embedding's `clip_l` / `clip_g` vectors (None: the file's only vectors). The refiner's one
    # encoder is SDXL's second, so the base model's LoRAs and embeddings reach it too.
    lora_net: Literal["te0", "te1", "te2"] = "te0"
    embedding_key: str | None = None
    activation: Literal["quick_gelu", "gelu"] | None = None  # None: the layout's own (SD3's CLIP-G: gelu)


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    text_encoders: tuple[TextEncoderSlot, ...]
    prediction: Prediction
    default_size: int
    inpaint: bool = False
    # The latent space the denoiser works in is `(z - latent_shift) * latent_scale` of the VAE's z.
    latent_scale: float = 0.18215
    latent_shift: float = 0.0
    # How the text encoders' outputs are combined (`text.conditioning.COMBINE_RULES`).
    text_combine: str = "concat"
    # Image sizes must be multiples of this (the VAE's factor times what the denoiser needs).
    size_multiple: int = 8
    clip_skip: int = 1  # the layer the family conditions on: SD2 uses the penultimate one
    unet_num_heads: int | None = None  # heads are not in the shapes: the family's rule
    unet_head_channels: int | None = None
    base_model_version: str = ""  # kohya's ss_base_model_version
    # SDXL conditions on the penultimate layer *without* the final LayerNorm (SD1's CLIP skip
    # and SD2 apply it), and adds a vector `y`: the pooled text embedding plus size embeddings.
    text_final_norm: bool = True
    added_conditioning: Literal["sdxl", "sdxl-refiner"] | None = None
    diffusers_pipeline: str = "StableDiffusionPipeline"
    # Trained on the schedule rescaled to zero terminal SNR (NoobAI-XL v-pred, kohya's
    # --zero_terminal_snr): sampled on it too (sampling.schedules.discrete_schedule).
    zero_terminal_snr: bool = False
    # The ends of the "scaled linear" beta schedule the model was trained on (the LDM yaml's
    # linear_start / linear_end, a diffusers scheduler's beta_start / beta_end): the same in
    # every released SD model, but a diffusers folder may state others, and sampling must
    # use them. Single files cannot say; sdlab's own files keep them in their metadata.
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # Rectified-flow families (SD3): sampled with `Flow(flow_shift)`; None for the discrete ones.
    flow_shift: float | None = None

    @property
    def is_flow(self) -> bool:
        return self.flow_shift is not None

    @property
    def size_numbers(self) -> int:
        """How many micro-conditioning numbers y embeds after the pooled text: the base model's
        original size, crop top-left and target size (6); the refiner's original size, crop
        top-left and aesthetic score (5); 0 without y."""
        return {"sdxl": 6, "sdxl-refiner": 5}.get(self.added_conditioning, 0)


_CLIP_L = TextEncoderSlot("cond_stage_model.transformer.", "openai", "eos")
_OPENCLIP_H = TextEncoderSlot("cond_stage_model.model.", "openclip", "zero")
_SDXL_L = TextEncoderSlot("conditioner.embedders.0.transformer.", "openai", "eos", embedding_key="clip_l")
_SDXL_G = TextEncoderSlot("conditioner.embedders.1.model.", "openclip", "zero", "text_encoder_2", "tokenizer_2",
                          lora_net="te1", embedding_key="clip_g")
_REFINER_G = TextEncoderSlot("conditioner.embedders.0.model.", "openclip", "zero", "text_encoder_2", "tokenizer_2",
                             lora_net="te1", embedding_key="clip_g")
# SD3 / SD3.5: CLIP-L, CLIP-G (both in transformers' layout) and T5-XXL under `text_encoders.`;
# any may be absent from a file (sdlab needs one CLIP: the other's part is zeros, as in ComfyUI).
_SD3_L = TextEncoderSlot("text_encoders.clip_l.transformer.", "openai", "eos", embedding_key="clip_l")
_SD3_G = TextEncoderSlot("text_encoders.clip_g.transformer.", "openai", "zero", "text_encoder_2", "tokenizer_2",
                         lora_net="te1", embedding_key="clip_g", activation="gelu")
_SD3_T5 = TextEncoderSlot("text_encoders.t5xxl.transformer.", "t5", "zero", "text_encoder_3", "tokenizer_3",
                          lora_net="te2", embedding_key="t5")
_SD3 = dict(latent_scale=1.5305, latent_shift=0.0609, text_combine="sd3", size_multiple=16, clip_skip=2,
            text_final_norm=False, flow_shift=3.0, diffusers_pipeline="StableDiffusion3Pipeline")
_SDXL = dict(latent_scale=0.13025, clip_skip=2, unet_head_channels=64, text_final_norm=False)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", "Stable Diffusion 1.x", (_CLIP_L,), "eps", 512, unet_num_heads=8, base_model_version="sd_v1"),
    Family("sd1-inpaint", "Stable Diffusion 1.x inpainting", (_CLIP_L,), "eps", 512, inpaint=True,
           unet_num_heads=8, base_model_version="sd_v1", diffusers_pipeline="StableDiffusionInpaintPipeline"),
    Family("sd2", "Stable Diffusion 2.x (512, eps)", (_OPENCLIP_H,), "eps", 512, clip_skip=2,
           unet_head_channels=64, base_model_version="sd_v2"),
    Family("sd2-v", "Stable Diffusion 2.x (768, v-prediction)", (_OPENCLIP_H,), "v", 768, clip_skip=2,
           unet_head_channels=64, base_model_version="sd_v2_768_v"),
    Family("sd2-inpaint", "Stable Diffusion 2.x inpainting", (_OPENCLIP_H,), "eps", 512, inpaint=True, clip_skip=2,
           unet_head_channels=64, base_model_version="sd_v2", diffusers_pipeline="StableDiffusionInpaintPipeline"),
    Family("sdxl", "Stable Diffusion XL", (_SDXL_L, _SDXL_G), "eps", 1024, added_conditioning="sdxl",
           base_model_version="sdxl_base_v1-0", diffusers_pipeline="StableDiffusionXLPipeline", **_SDXL),
    Family("sdxl-inpaint", "Stable Diffusion XL inpainting", (_SDXL_L, _SDXL_G), "eps", 1024, inpaint=True,
           added_conditioning="sdxl", base_model_version="sdxl_base_v1-0",
           diffusers_pipeline="StableDiffusionXLInpaintPipeline", **_SDXL),
    Family("sdxl-refiner", "Stable Diffusion XL refiner", (_REFINER_G,), "eps", 1024,
           added_conditioning="sdxl-refiner", base_model_version="sdxl_refiner_v1-0",
           diffusers_pipeline="StableDiffusionXLImg2ImgPipeline", **_SDXL),
    Family("sd3", "Stable Diffusion 3", (_SD3_L, _SD3_G, _SD3_T5), "flow", 1024, base_model_version="sd3", **_SD3),
    Family("sd3.5-large", "Stable Diffusion 3.5 Large", (_SD3_L, _SD3_G, _SD3_T5), "flow", 1024,
           base_model_version="sd3.5_large", **_SD3),
    Family("sd3.5-medium", "Stable Diffusion 3.5 Medium", (_SD3_L, _SD3_G, _SD3_T5), "flow", 1024,
           base_model_version="sd3.5_medium", **_SD3),
)}

# The MMDiT's marker key in a single file (SD3's denoiser is not a UNet).
MMDIT_MARKER = UNET_PREFIX + "x_embedder.proj.weight"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the networks of one checkpoint."""

    family: Family
    unet: UNetConfig | MMDiTConfig  # the denoiser's config: an MMDiT's for the flow families (SD3)
    vae: VAEConfig
    text_encoders: tuple[CLIPTextConfig | T5Config, ...]  # those present, in the family's slot order

    def __post_init__(self) -> None:
        # SDXL's y is built outside the UNet (pooled text ++ embedded numbers) and read by its
        # first Linear: a width that does not add up would fail only there, mid-generation.
        n = self.family.size_numbers
        if n and self.unet.adm_in_channels is not None and self.text_encoders:
            pooled = pooled_width(self.text_encoders[-1])
            if self.unet.adm_in_channels != pooled + n * self.unet.size_embed_dim:
                raise ValueError(f"the UNet's adm_in_channels {self.unet.adm_in_channels} must be the pooled text "
                                 f"width {pooled} plus {n} x size_embed_dim {self.unet.size_embed_dim}")

    @property
    def prediction(self) -> Prediction:
        return self.family.prediction

    @property
    def denoiser(self) -> UNetConfig | MMDiTConfig:
        """The denoiser's config (`unet` under its general name)."""
        return self.unet

    def to_json(self) -> str:
        return json.dumps({"family": self.family.name, "prediction": self.family.prediction,
                           "default_size": self.family.default_size, "latent_scale": self.family.latent_scale,
                           "zero_terminal_snr": self.family.zero_terminal_snr,
                           "beta_start": self.family.beta_start, "beta_end": self.family.beta_end,
                           **({"latent_shift": self.family.latent_shift, "flow_shift": self.family.flow_shift,
                               "text_encoder_slots": [s.prefix for s in self.family.text_encoders]}
                              if self.family.is_flow else {}),
                           "unet": asdict(self.unet), "vae": asdict(self.vae),
                           "text_encoders": [asdict(c) for c in self.text_encoders]})

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        family = FAMILIES[d["family"]]
        # Our own files may differ from the family's defaults (the demo model is 64x64).
        family = replace(family, **{k: d[k] for k in ("prediction", "default_size", "latent_scale", "zero_terminal_snr",
                                                      "beta_start", "beta_end", "latent_shift", "flow_shift") if k in d})
        tes = tuple(_dataclass_from_dict(T5Config if "d_model" in c else CLIPTextConfig, c) for c in d["text_encoders"])
        if "text_encoder_slots" in d:  # an SD3 model saved without some of its encoders
            family = replace(family, text_encoders=tuple(s for s in family.text_encoders
                                                         if s.prefix in d["text_encoder_slots"]))
        elif len(tes) < len(family.text_encoders):  # written before the slots were: only T5 could be absent
            family = replace(family, text_encoders=family.text_encoders[:len(tes)])
        return cls(family, _dataclass_from_dict(MMDiTConfig if family.is_flow else UNetConfig, d["unet"]),
                   _dataclass_from_dict(VAEConfig, d["vae"]), tes)


def pooled_width(cfg: CLIPTextConfig) -> int:
    """Width of a text encoder's pooled output (its projection's, if it has one)."""
    return cfg.projection_dim or cfg.width


def _dataclass_from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def detect_family(shapes: Shapes) -> Family:
    """The family of a single-file state dict, from its marker keys (a pure function).

    SDXL base has CLIP-L and OpenCLIP bigG under `conditioner.embedders.0/1`; the
    refiner has only bigG, as embedder 0. SD2 checkpoints do not say whether they
    predict eps or v; this returns the eps
    entry and the loader settles it (`looks_like_v_prediction`, or the user's
    `--prediction`).
    """
    keys = shapes.keys()
    if MMDIT_MARKER in shapes:
        return detect_sd3_family(shapes)
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise SdlabError(_not_a_model_reason(keys))
    inpaint = conv_in[1] == 9
    if any(k.startswith(_SDXL_G.prefix) for k in keys):
        return FAMILIES["sdxl-inpaint" if inpaint else "sdxl"]
    if any(k.startswith(_REFINER_G.prefix) for k in keys):
        return FAMILIES["sdxl-refiner"]
    if any(k.startswith(_CLIP_L.prefix) for k in keys):
        return FAMILIES["sd1-inpaint" if inpaint else "sd1"]
    if any(k.startswith(_OPENCLIP_H.prefix) for k in keys):
        return FAMILIES["sd2-inpaint" if inpaint else "sd2"]
    raise SdlabError("the checkpoint has a UNet but no text encoder this version knows "
                     "(expected cond_stage_model.transformer.* or cond_stage_model.model.*)")


def detect_sd3_family(shapes: Shapes) -> Family:
    """SD3.5-medium has MMDiT-X's second attention (`x_block.attn2`), SD3.5-large (and its turbo)
    qk RMSNorm without it, SD3-medium neither (the reference's and ComfyUI's key tests)."""
    if any(k.startswith(UNET_PREFIX + "joint_blocks.") and ".x_block.attn2." in k for k in shapes):
        return FAMILIES["sd3.5-medium"]
    if UNET_PREFIX + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes:
        return FAMILIES["sd3.5-large"]
    return FAMILIES["sd3"]


def looks_like_lora(keys) -> bool:
    """Whether a state dict's keys are a LoRA's (kohya, LyCORIS or diffusers/PEFT)."""
    return any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_A." in k or ".lora_down." in k for k in keys)


def _not_a_model_reason(keys) -> str:
    sample = next(iter(keys), "")
    if looks_like_lora(keys):
        return "this is a LoRA file, not a model: put it in the Lora folder and use <lora:NAME:1> in the prompt"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "this is a single diffusers network file, not a checkpoint: give the whole diffusers folder"
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") for k in keys):
        return "this is a textual-inversion embedding, not a model: put it in the embeddings folder"
    return f"not a Stable Diffusion checkpoint this version knows (no {UNET_PREFIX}* keys; first key {sample!r})"


def model_config(shapes: Shapes, metadata: Mapping[str, str] | None = None,
                 prediction: Prediction | None = None) -> ModelConfig:
    """Family and network configs of a single-file state dict.

    Files sdlab wrote carry their exact config in the `sdlab.config` metadata entry;
    everything else is read off the shapes, and the marker keys that ComfyUI and the web UIs read
    (NoobAI-XL v-pred has both): `v_pred`, a v-prediction model, and `ztsnr`, one trained on the
    zero-terminal-SNR schedule.
    """
    if metadata and "sdlab.config" in metadata:
        cfg = ModelConfig.from_json(metadata["sdlab.config"])
    elif MMDIT_MARKER in shapes:
        cfg = sd3_model_config(shapes)
    else:
        family = detect_family(shapes)
        if "ztsnr" in shapes:
            family = replace(family, zero_terminal_snr=True)
        unet = unet_config_from_shapes(_strip(shapes, UNET_PREFIX), num_heads=family.unet_num_heads,
                                       num_head_channels=family.unet_head_channels)
        vae = vae_config_from_shapes(_strip(shapes, VAE_PREFIX))
        tes = tuple(clip_config_from_shapes(_strip(shapes, slot.prefix), slot.layout) for slot in family.text_encoders)
        if family.size_numbers and unet.adm_in_channels is not None:
            unet = replace(unet, size_embed_dim=size_embed_dim_from_shapes(unet.adm_in_channels, family, tes[-1]))
        cfg = ModelConfig(family, unet, vae, tes)
        if "v_pred" in shapes:
            cfg = with_prediction(cfg, "v")
    if prediction is not None:
        cfg = with_prediction(cfg, prediction)
    return cfg


def sd3_model_config(shapes: Shapes, extra: Shapes | None = None) -> ModelConfig:
    """The config of an SD3 / SD3.5 single file: the MMDiT's and VAE's off their shapes, and the
    text encoders the file (or `extra`, the shapes of separate encoder files under the same
    `text_encoders.*` prefixes, which win) holds. One CLIP at least is needed; T5 is optional.

    Raises:
        SdlabError: no VAE, neither CLIP, or a T5 whose width is not the MMDiT's context width.
    """
    from .models.mmdit import config_from_state_dict as mmdit_config
    from .models.t5 import config_from_state_dict as t5_config
    from .models.vae import config_from_state_dict as vae_config

    family = detect_sd3_family(shapes)
    mmdit = mmdit_config(shapes, UNET_PREFIX)
    if not any(k.startswith(VAE_PREFIX) for k in shapes):
        raise SdlabError("the SD3 checkpoint holds no VAE (first_stage_model.*); give one with --vae")
    vae = vae_config(shapes, VAE_PREFIX)
    merged = dict(shapes)
    if extra:
        for slot in family.text_encoders:  # a separate file replaces the checkpoint's own copy
            if any(k.startswith(slot.prefix) for k in extra):
                merged = {k: v for k, v in merged.items() if not k.startswith(slot.prefix)}
        merged.update(extra)
    slots, tes = [], []
    for slot in family.text_encoders:
        part = _strip(merged, slot.prefix)
        if not part:
            continue
        if slot.layout == "t5":
            te = t5_config(part)
            if te.d_model != mmdit.context_dim:
                raise SdlabError(f"the T5 encoder is {te.d_model} wide but this MMDiT reads {mmdit.context_dim}-wide "
                                 "text tokens: use T5-XXL (t5xxl_fp16 / t5xxl_fp8_e4m3fn), not a smaller T5")
        else:
            te = clip_config_from_shapes(part, slot.layout)
            te = replace(te, activation=slot.activation or te.activation)
        slots.append(slot)
        tes.append(te)
    names = [s.prefix.split(".")[1] for s in slots]
    if "clip_l" not in names and "clip_g" not in names:
        # One CLIP alone is enough: the other's part is zeros (ComfyUI's rule, `checkpoints.sd3`).
        raise SdlabError("the SD3 model has no clip_l and clip_g text encoder: give them with --clip-l / --clip-g "
                         "(clip_l.safetensors, clip_g.safetensors), or use a checkpoint that includes the CLIPs")
    return ModelConfig(replace(family, text_encoders=tuple(slots)), mmdit, vae, tuple(tes))


def size_embed_dim_from_shapes(adm_in_channels: int, family: Family, pooled_encoder: CLIPTextConfig) -> int:
    """The width of each size number's embedding in SDXL's y, which no tensor holds on its own:
    y (the width of `label_emb.0.0.weight`) is the pooled text followed by `family.size_numbers`
    embeddings of one width (256 in the released models: (2816 - 1280) / 6, (2560 - 1280) / 5)."""
    pooled, n = pooled_width(pooled_encoder), family.size_numbers
    dim, rest = divmod(adm_in_channels - pooled, n)
    if dim < 1 or rest:
        raise SdlabError(f"the UNet's vector input (label_emb.0.0.weight) is {adm_in_channels} wide, not the pooled "
                         f"text width {pooled} plus {n} equal size embeddings: the file is damaged or not a "
                         f"{family.label} model")
    return dim


def with_prediction(cfg: ModelConfig, prediction: Prediction) -> ModelConfig:
    """The same networks under the family entry that has the given prediction type."""
    if prediction == cfg.family.prediction:
        return cfg
    ztsnr = {"zero_terminal_snr": cfg.family.zero_terminal_snr}
    if cfg.family.name == "sd2" and prediction == "v":
        return replace(cfg, family=replace(FAMILIES["sd2-v"], **ztsnr))
    if cfg.family.name == "sd2-v" and prediction == "eps":
        return replace(cfg, family=replace(FAMILIES["sd2"], **ztsnr))
    # Other families have no entry of the other kind; keep the family, change the type.
    return replace(cfg, family=replace(cfg.family, prediction=prediction))


def _strip(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def vae_config_from_shapes(shapes: Shapes) -> VAEConfig:
    """AutoencoderKL config read off `first_stage_model.*` shapes (prefix stripped)."""
    try:
        conv_in = shapes["encoder.conv_in.weight"]
        levels = _count(shapes, r"encoder\.down\.(\d+)\.")
        base = conv_in[0]
        mult = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // base for i in range(levels))
        return VAEConfig(
            in_channels=conv_in[1],
            out_channels=shapes["decoder.conv_out.weight"][0],
            latent_channels=shapes["post_quant_conv.weight"][0],
            base_channels=base,
            channel_mult=mult,
            num_res_blocks=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
        )
    except KeyError as e:
        raise SdlabError(f"the VAE weights are incomplete (missing {VAE_PREFIX}{e.args[0]})") from None


def clip_config_from_shapes(shapes: Shapes, layout: Literal["openai", "openclip"]) -> CLIPTextConfig:
    """CLIP text-encoder config read off its shapes (prefix stripped). Every released
    CLIP text encoder uses 64 channels per head, so heads = width / 64."""
    try:
        if layout == "openai":
            vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
            return CLIPTextConfig(
                layout="openai", vocab_size=vocab, width=width,
                layers=_count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
                heads=max(1, width // 64),
                mlp_width=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
                max_positions=shapes["text_model.embeddings.position_embedding.weight"][0],
                activation="quick_gelu",
                projection_dim=shapes["text_projection.weight"][0] if "text_projection.weight" in shapes else None,
            )
        vocab, width = shapes["token_embedding.weight"]
        return CLIPTextConfig(
            layout="openclip", vocab_size=vocab, width=width,
            layers=_count(shapes, r"transformer\.resblocks\.(\d+)\."),
            heads=max(1, width // 64),
            mlp_width=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
            max_positions=shapes["positional_embedding"][0],
            activation="gelu",
            projection_dim=shapes["text_projection"][1] if "text_projection" in shapes else None,
        )
    except KeyError as e:
        raise SdlabError(f"the text encoder weights are incomplete (missing key ending {e.args[0]!r})") from None
