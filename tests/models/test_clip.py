"""CLIP text encoder: equal to transformers' CLIPTextModel on the same random weights, loaded
through diffusers' own single-file converters (which proves the checkpoint key layout too)."""

import re

import pytest
import torch
import transformers
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

from sdlab.models.clip import PRESETS, CLIPTextConfig, CLIPTextModel

ATOL = 1e-4


def tiny(layout: str, **kw) -> CLIPTextConfig:
    # Real vocab size keeps real token ids (BOS 49406, EOS 49407) valid.
    base = dict(width=64, layers=3, heads=4, mlp_width=128)
    if layout == "openclip":
        base.update(activation="gelu", projection_dim=48)
    return CLIPTextConfig(layout=layout, **{**base, **kw})


def random_model(cfg: CLIPTextConfig, seed: int = 0) -> CLIPTextModel:
    """Seeded weights at unit scale; LayerNorm gains near 1 so no layer is washed out."""
    g = torch.Generator().manual_seed(seed)
    model = CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * noise if re.search(r"(norm|ln)[^.]*\.weight$", name) else 0.1 * noise)
            elif "embedding" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def hf_config(cfg: CLIPTextConfig, layers: int | None = None) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=layers or cfg.layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions, hidden_act=cfg.activation,
        projection_dim=cfg.projection_dim or cfg.width, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
        attn_implementation="eager")


def load_hf(hf: torch.nn.Module, converted: dict[str, torch.Tensor]) -> None:
    """Strict load of diffusers' converted dict. transformers 5 flattened CLIPTextModel (no
    `text_model.` level; from_pretrained renames on load), so strip that level when absent."""
    if not any(k.startswith("text_model.") for k in hf.state_dict()):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    hf.load_state_dict(converted, strict=True)


def tokens() -> torch.Tensor:
    """Rows padded SD1-style (with EOS, so pooling must pick the *first* EOS) and SD2-style (with 0)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 49406, (3, 77), generator=g)
    ids[:, 0] = 49406
    ids[0, 9:] = 49407
    ids[1, 30] = 49407
    ids[1, 31:] = 0
    ids[2, 76] = 49407  # a full row
    return ids


def ours(model: CLIPTextModel, skip: int, **kw):
    with torch.no_grad():
        return model(tokens(), skip=skip, **kw)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_openai_layout_matches_transformers():
    model = random_model(tiny("openai"))
    ckpt = {"cond_stage_model.transformer." + k: v for k, v in model.state_dict().items()}
    hf = transformers.CLIPTextModel(hf_config(model.cfg)).eval()
    load_hf(hf, convert_ldm_clip_checkpoint(ckpt))
    with torch.no_grad():
        ref = hf(tokens(), output_hidden_states=True)
        ln = getattr(hf, "text_model", hf).final_layer_norm
        assert maxdiff(ours(model, 1).hidden, ref.last_hidden_state) < ATOL
        assert maxdiff(ours(model, 2).hidden, ln(ref.hidden_states[-2])) < ATOL
        assert maxdiff(ours(model, 3).hidden, ln(ref.hidden_states[-3])) < ATOL
        assert maxdiff(ours(model, 2, final_norm=False).hidden, ref.hidden_states[-2]) < ATOL
        assert maxdiff(ours(model, 1).pooled, ref.pooler_output) < ATOL
    assert ref.last_hidden_state.abs().mean() > 0.3  # unit-scale outputs, so the tolerance means something


def test_openai_layout_with_projection_matches_transformers():
    """SD3-style clip_l / clip_g: OpenAI names plus a bias-free `text_projection` Linear; the keys
    are transformers' CLIPTextModelWithProjection keys, so the state dict loads as it is."""
    model = random_model(tiny("openai", activation="gelu", projection_dim=48))
    hf = transformers.CLIPTextModelWithProjection(hf_config(model.cfg)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        ref = hf(tokens(), output_hidden_states=True)
        assert maxdiff(ours(model, 1).hidden, ref.last_hidden_state) < ATOL
        assert maxdiff(ours(model, 1).pooled, ref.text_embeds) < ATOL


def test_openclip_layout_matches_transformers_with_projection():
    # SDXL's prefix: diffusers converts its text_projection (SD2's prefix has it on an ignore list).
    model = random_model(tiny("openclip"))
    prefix = "conditioner.embedders.1.model."
    ckpt = {prefix + k: v for k, v in model.state_dict().items()}
    hf = transformers.CLIPTextModelWithProjection(hf_config(model.cfg)).eval()
    load_hf(hf, convert_open_clip_checkpoint(hf, ckpt, prefix=prefix))
    with torch.no_grad():
        ref = hf(tokens(), output_hidden_states=True)
        ln = getattr(hf, "text_model", hf).final_layer_norm
        assert maxdiff(ours(model, 1).hidden, ref.last_hidden_state) < ATOL
        assert maxdiff(ours(model, 2).hidden, ln(ref.hidden_states[-2])) < ATOL
        # SDXL's UNet context: penultimate layer without the final norm (diffusers' hidden_states[-2]).
        assert maxdiff(ours(model, 2, final_norm=False).hidden, ref.hidden_states[-2]) < ATOL
        assert maxdiff(ours(model, 1).pooled, ref.text_embeds) < ATOL


def test_sd2_penultimate_equals_diffusers_shortened_encoder():
    """SD2 single files hold all layers and use the penultimate one + ln_final; diffusers' SD2
    folders hold one layer fewer and use the last one. Both must give the same context."""
    model = random_model(tiny("openclip"))
    last = model.cfg.layers - 1
    # diffusers drops layer 23 and the projection by name (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE);
    # for the tiny model we drop the same things ourselves.
    ckpt = {"cond_stage_model.model." + k: v for k, v in model.state_dict().items()
            if not k.startswith(f"transformer.resblocks.{last}.") and k != "text_projection"}
    hf = transformers.CLIPTextModel(hf_config(model.cfg, layers=last)).eval()
    load_hf(hf, convert_open_clip_checkpoint(hf, ckpt))
    with torch.no_grad():
        assert maxdiff(ours(model, 2).hidden, hf(tokens()).last_hidden_state) < ATOL


def test_embeddings_argument_replaces_token_lookup():
    model = random_model(tiny("openclip"))
    with torch.no_grad():
        emb = model.embed_tokens(tokens())
        a, b = model(tokens(), skip=2), model(tokens(), skip=2, embeddings=emb)
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)
        c = model(tokens(), embeddings=emb + 0.5 * torch.randn_like(emb))
        assert maxdiff(a.pooled, c.pooled) > 1e-2


def test_position_ids_are_not_state():
    model = CLIPTextModel(tiny("openai"))
    assert not any("position_ids" in k for k in model.state_dict())


def test_ignored_keys():
    ignored = lambda key: any(re.search(p, key) for p in CLIPTextModel.IGNORED_KEYS)  # noqa: E731
    assert ignored("text_model.embeddings.position_ids")
    assert ignored("logit_scale") and ignored("attn_mask") and ignored("transformer.resblocks.0.attn_mask")
    for cfg in (tiny("openai"), tiny("openclip")):
        assert not any(ignored(k) for k in CLIPTextModel(cfg).state_dict())


def test_config_validation():
    with pytest.raises(ValueError, match="divide"):
        CLIPTextConfig(layout="openai", width=64, heads=5)
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPTextConfig(layout="openclip", projection_dim=0)
    with pytest.raises(ValueError, match="skip"):
        CLIPTextModel(tiny("openai"))(tokens(), skip=4)


# ---- full-size presets, built on the meta device (no memory, no time) ----

def expected_keys(cfg: CLIPTextConfig) -> dict[str, tuple[int, ...]]:
    """The text-encoder keys of real SD single files (prefix stripped), with shapes."""
    w, m, n = cfg.width, cfg.mlp_width, cfg.layers
    keys: dict[str, tuple[int, ...]] = {}
    if cfg.layout == "openai":
        keys["text_model.embeddings.token_embedding.weight"] = (cfg.vocab_size, w)
        keys["text_model.embeddings.position_embedding.weight"] = (77, w)
        keys["text_model.final_layer_norm.weight"] = keys["text_model.final_layer_norm.bias"] = (w,)
        for i in range(n):
            p = f"text_model.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                keys[f"{p}self_attn.{proj}.weight"], keys[f"{p}self_attn.{proj}.bias"] = (w, w), (w,)
            for ln in ("layer_norm1", "layer_norm2"):
                keys[f"{p}{ln}.weight"] = keys[f"{p}{ln}.bias"] = (w,)
            keys[f"{p}mlp.fc1.weight"], keys[f"{p}mlp.fc1.bias"] = (m, w), (m,)
            keys[f"{p}mlp.fc2.weight"], keys[f"{p}mlp.fc2.bias"] = (w, m), (w,)
    else:
        keys["token_embedding.weight"] = (cfg.vocab_size, w)
        keys["positional_embedding"] = (77, w)
        keys["ln_final.weight"] = keys["ln_final.bias"] = (w,)
        keys["text_projection"] = (w, cfg.projection_dim)
        for i in range(n):
            p = f"transformer.resblocks.{i}."
            keys[p + "attn.in_proj_weight"], keys[p + "attn.in_proj_bias"] = (3 * w, w), (3 * w,)
            keys[p + "attn.out_proj.weight"], keys[p + "attn.out_proj.bias"] = (w, w), (w,)
            for ln in ("ln_1", "ln_2"):
                keys[f"{p}{ln}.weight"] = keys[f"{p}{ln}.bias"] = (w,)
            keys[p + "mlp.c_fc.weight"], keys[p + "mlp.c_fc.bias"] = (m, w), (m,)
            keys[p + "mlp.c_proj.weight"], keys[p + "mlp.c_proj.bias"] = (w, m), (w,)
    return keys


# Parameter counts, checked against transformers' models of the same configs (on meta):
# CLIP-L text 123.06 M; OpenCLIP-H text incl. text_projection 354.03 M; bigG 694.66 M.
@pytest.mark.parametrize("name, layers, count", [
    ("clip-l", 12, 123_060_480), ("openclip-h", 24, 354_032_640), ("openclip-bigg", 32, 694_659_840)])
def test_preset_keys_and_parameter_count(name, layers, count):
    cfg = PRESETS[name]
    assert cfg.layers == layers
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
        hf_cls = transformers.CLIPTextModel if cfg.projection_dim is None else transformers.CLIPTextModelWithProjection
        hf = hf_cls(hf_config(cfg))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_keys(cfg)
    assert sum(p.numel() for p in model.parameters()) == count == sum(p.numel() for p in hf.parameters())
