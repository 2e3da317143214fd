"""LoRA files at inference: kohya / LyCORIS / diffusers-PEFT formats, merged into a tiny
random model and checked against diffusers' `load_lora_weights` + `fuse_lora` on the same
weights, against the LyCORIS formulas, and for exact restoration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
from sdlab.checkpoints.io import save_safetensors
from sdlab.errors import SdlabError
from sdlab.lora import (
    LoraSpec,
    LoraState,
    LoraUse,
    apply_loras,
    kohya_name,
    load_lora,
    lora_specs,
    native_module_path,
)
from sdlab.text.prompt import extract_extra_networks

from .tiny import tiny_bundle

# Layers kohya does not train (conv_in / conv_out / time embedding), left out of the parity LoRA.
_NOT_TRAINED = ("time_embed.", "input_blocks.0.0", "out.2")


def _layers(net: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not p.startswith(skip)]


def _factors(m: nn.Module, rank: int, g: torch.Generator, std: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's (down, up) for a layer: a 3x3 conv gets a 3x3 down and a 1x1 up (LoCon)."""
    if isinstance(m, nn.Conv2d):
        return (torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * std,
                torch.randn(m.out_channels, rank, 1, 1, generator=g) * std)
    return torch.randn(rank, m.in_features, generator=g) * std, torch.randn(m.out_features, rank, generator=g) * std


def _kohya(bundle, unet: bool = True, te: bool = True, rank: int = 4, alpha: float = 2.0, seed: int = 0,
           te_layers: int | None = None, native_names: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    parts = []
    if unet:
        parts += [("unet", p, m) for p, m in _layers(bundle.unet, _NOT_TRAINED)]
    if te:
        layers = _layers(bundle.text_encoders[0])
        if te_layers is not None:  # SD2 in diffusers: the last layer is not in the folder
            layers = [(p, m) for p, m in layers if int(p.split(".")[3 if p.startswith("text_model") else 2]) < te_layers]
        parts += [("te", p, m) for p, m in layers]
        if bundle.text_encoders[0].cfg.layout == "openclip":  # q, k, v: rows of the fused in_proj_weight
            w = bundle.text_encoders[0].cfg.width
            for i in range(te_layers if te_layers is not None else bundle.text_encoders[0].cfg.layers):
                for x in "qkv":
                    parts.append(("te", f"transformer.resblocks.{i}.attn.{x}_proj", nn.Linear(w, w, device="meta")))
    for part, path, m in parts:
        down, up = _factors(m, rank, g)
        name = kohya_name(path, part, None if native_names else bundle.unet.cfg)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


def _inputs(bundle, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = bundle.config.unet
    x = torch.randn(2, u.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 77, u.context_dim, generator=g)
    tokens = bundle.tokenizers[0](["a red circle, on a blue background", ""])
    return x, torch.tensor([10.0, 700.0]), ctx, tokens


@torch.no_grad()
def _ours(bundle) -> dict[str, torch.Tensor]:
    x, t, ctx, tokens = _inputs(bundle)
    return {"unet": bundle.unet(x, t, ctx), "text": bundle.text_encoders[0](tokens, skip=bundle.family.clip_skip).hidden}


@torch.no_grad()
def _theirs(pipe, bundle) -> dict[str, torch.Tensor]:
    x, t, ctx, tokens = _inputs(bundle)
    # diffusers' SD2 folder ends at the penultimate layer: its last state is our skip=2.
    return {"unet": pipe.unet(x, t, ctx).sample, "text": pipe.text_encoder(tokens)[0]}


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


def _pipeline(folder: Path):
    pytest.importorskip("peft")  # diffusers' load_lora_weights needs it (test extra)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _snapshot(bundle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bundle.state_dict().items()}


def _assert_unchanged(bundle, snapshot: dict[str, torch.Tensor]) -> None:
    changed = [k for k, v in bundle.state_dict().items() if not torch.equal(v, snapshot[k])]
    assert not changed, f"{len(changed)} weights changed, e.g. {changed[:3]}"


@pytest.fixture(scope="module")
def _tiny_models() -> dict:
    return {}


@pytest.fixture
def tiny(_tiny_models):
    """`tiny(family)`: a tiny random bundle built once per module and put back to its
    original weights after each test (building one costs more than restoring it)."""
    used = set()

    def get(family: str = "sd1"):
        if family not in _tiny_models:
            b = tiny_bundle(family)
            _tiny_models[family] = (b, {n: {k: v.clone() for k, v in net.state_dict().items()}
                                        for n, net in b.networks().items()})
        used.add(family)
        return _tiny_models[family][0]

    yield get
    for family in used:
        b, original = _tiny_models[family]
        for n, net in b.networks().items():
            net.load_state_dict(original[n])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Diffusers folders of the tiny SD1 and SD2 models (written once per module)."""
    out = {}
    for family in ("sd1", "sd2"):
        b = tiny_bundle(family)
        out[family] = tmp_path_factory.mktemp("models") / family
        write_diffusers_folder(b.state_dict(), b.config, out[family])
    return out


# ---------------------------------------------------------------- parity with diffusers


def test_kohya_lora_matches_diffusers(tmp_path, folders, tiny):
    """kohya format, UNet attention + LoCon convs + text encoder, multiplier 0.7 both ways."""
    bundle = tiny("sd1")
    sd = _kohya(bundle)
    # The names are kohya's spelling, not only what our own kohya_name says they are.
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out",
                 "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                 "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
                 "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj",
                 "lora_te_text_model_encoder_layers_1_self_attn_out_proj", "lora_te_text_model_encoder_layers_0_mlp_fc2"):
        assert f"{name}.lora_down.weight" in sd, name
    path = tmp_path / "style.safetensors"
    save_safetensors(sd, path, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})

    before = _ours(bundle)
    applied = apply_loras(bundle, [(load_lora(path), 0.7, 0.7)])
    assert applied.unmatched == {} and applied.touched_unet and applied.touched_text_encoders
    ours = _ours(bundle)

    pipe = _pipeline(folders["sd1"])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.7)
    diffs = _max_diff(ours, _theirs(pipe, bundle))
    effect = _max_diff(ours, before)
    print(f"kohya vs diffusers: max abs diff {diffs}; LoRA effect {effect}")
    assert all(d < 1e-4 for d in diffs.values()), diffs
    assert all(e > 1e-2 for e in effect.values()), effect  # the LoRA really changed both networks


def _peft_file(pipe, path: Path, text_model_level: bool = False) -> None:
    """A diffusers/PEFT LoRA as diffusers saves one: `unet.<module>.lora_A.weight`, the
    LoraConfig of each network in the `lora_adapter_metadata` entry."""
    from peft import LoraConfig

    g = torch.Generator().manual_seed(1)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "time_emb_proj"]
    te_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    sd = {}
    for prefix, net, targets, rank in (("unet", pipe.unet, unet_targets, 4), ("text_encoder", pipe.text_encoder, te_targets, 2)):
        for name, m in net.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets):
                down, up = _factors(m, rank, g)
                if prefix == "text_encoder" and text_model_level and not name.startswith("text_model."):
                    name = "text_model." + name  # how transformers 4 named CLIPTextModel's modules
                sd[f"{prefix}.{name}.lora_A.weight"], sd[f"{prefix}.{name}.lora_B.weight"] = down, up
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=unet_targets, alpha_pattern={"to_k": 2}),
               "text_encoder": LoraConfig(r=2, lora_alpha=3, target_modules=te_targets)}
    meta = {f"{p}.{k}": (sorted(v) if isinstance(v, set) else v) for p, c in configs.items() for k, v in c.to_dict().items()}
    save_safetensors(sd, path, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})


def test_peft_lora_matches_diffusers(tmp_path, folders, tiny):
    bundle = tiny("sd1")
    pipe = _pipeline(folders["sd1"])
    path = tmp_path / "pytorch_lora_weights.safetensors"
    _peft_file(pipe, path)
    old = tmp_path / "old_names.safetensors"  # before transformers 5, names had a `text_model.` level
    _peft_file(pipe, old, text_model_level=True)
    lora = load_lora(path)
    assert {m.alpha for m in lora.modules if m.net == "unet"} == {8.0, 2.0}  # lora_alpha and alpha_pattern
    before = _ours(bundle)
    applied = apply_loras(bundle, [(lora, 0.6, 0.6)])
    assert applied.unmatched == {}
    ours = _ours(bundle)

    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.6)
    diffs = _max_diff(ours, _theirs(pipe, bundle))
    effect = _max_diff(ours, before)
    print(f"PEFT vs diffusers: max abs diff {diffs}; LoRA effect {effect}")
    assert all(d < 1e-4 for d in diffs.values()), diffs
    assert all(e > 1e-2 for e in effect.values()), effect

    # Files written before transformers 5 keep the `text_model.` level: the same weights.
    applied.restore()
    apply_loras(bundle, [(load_lora(old), 0.6, 0.6)])
    assert _max_diff(_ours(bundle), ours)["text"] < 1e-6


def test_sd2_openclip_text_encoder_matches_diffusers(tmp_path, folders, tiny):
    """SD2's OpenCLIP encoder fuses q, k, v: kohya's q_proj/k_proj/v_proj land on row slices."""
    bundle = tiny("sd2")
    te_layers = bundle.text_encoders[0].cfg.layers - 1  # what the diffusers folder holds
    sd = _kohya(bundle, te_layers=te_layers)
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in sd
    path = tmp_path / "sd2.safetensors"
    save_safetensors(sd, path)
    before = _ours(bundle)
    applied = apply_loras(bundle, [(load_lora(path), 0.8, 0.8)])
    assert applied.unmatched == {}
    ours = _ours(bundle)

    pipe = _pipeline(folders["sd2"])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    diffs = _max_diff(ours, _theirs(pipe, bundle))
    effect = _max_diff(ours, before)
    print(f"SD2 kohya vs diffusers: max abs diff {diffs}; LoRA effect {effect}")
    assert all(d < 1e-4 for d in diffs.values()), diffs
    assert all(e > 1e-2 for e in effect.values()), effect


# ---------------------------------------------------------------- names and formats


def _merged_with(bundle, path: Path) -> dict[str, torch.Tensor]:
    """The bundle's weights with one LoRA merged (the bundle is restored afterwards)."""
    with apply_loras(bundle, [(load_lora(path), 1, 1)]):
        return _snapshot(bundle)


def test_original_unet_spelling_equals_diffusers_spelling(tmp_path, tiny):
    bundle = tiny("sd1")
    save_safetensors(_kohya(bundle, te=False), tmp_path / "diffusers_names.safetensors")
    native = _kohya(bundle, te=False, native_names=True)
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in native
    assert "lora_unet_output_blocks_2_0_skip_connection.lora_up.weight" in native
    save_safetensors(native, tmp_path / "native_names.safetensors")
    a = _merged_with(bundle, tmp_path / "diffusers_names.safetensors")
    b = _merged_with(bundle, tmp_path / "native_names.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kohya_name_round_trip(tiny):
    for family in ("sd1", "sd2"):
        bundle = tiny(family)
        cfg = bundle.config
        paths = [("unet", p) for p, _ in _layers(bundle.unet)]
        paths += [("te", p) for p, _ in _layers(bundle.text_encoders[0])]
        if family == "sd2":
            paths += [("te", "transformer.resblocks.0.attn.v_proj")]
        for part, path in paths:
            name = kohya_name(path, part, cfg.unet)
            assert native_module_path(name, cfg) == (part, path), name
            assert native_module_path(kohya_name(path, part), cfg) == (part, path)  # the original spelling
    assert kohya_name("transformer.resblocks.3.mlp.c_fc", "te2") == "lora_te2_text_model_encoder_layers_3_mlp_fc1"
    with pytest.raises(SdlabError, match="names no layer"):
        native_module_path("lora_unet_down_blocks_7_attentions_0_proj_in", tiny("sd1").config)


def _weight(bundle, path: str) -> torch.Tensor:
    return bundle.unet.get_submodule(path).weight


def test_older_diffusers_spellings(tmp_path, tiny):
    """`.lora.down`, `.lora_linear_layer.down`, attention processors `to_q_lora`, `.alpha` keys."""
    bundle = tiny("sd1")
    g = torch.Generator().manual_seed(3)
    q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    out = "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0"
    te_q = "text_model.encoder.layers.0.self_attn.q_proj"
    d = "down_blocks.0.attentions.0.transformer_blocks.0."
    f = {n: _factors(m, 2, g) for n, m in ((q, bundle.unet.get_submodule(q)), (out, bundle.unet.get_submodule(out)),
                                            (te_q, bundle.text_encoders[0].get_submodule(te_q)))}
    sd = {f"unet.{d}attn1.to_q.lora.down.weight": f[q][0], f"unet.{d}attn1.to_q.lora.up.weight": f[q][1],
          f"unet.{d}attn1.to_q.alpha": torch.tensor(1.0),
          f"unet.{d}attn2.processor.to_out_lora.down.weight": f[out][0],
          f"unet.{d}attn2.processor.to_out_lora.up.weight": f[out][1],
          f"text_encoder.{te_q}.lora_linear_layer.down.weight": f[te_q][0],
          f"text_encoder.{te_q}.lora_linear_layer.up.weight": f[te_q][1]}
    save_safetensors(sd, tmp_path / "old.safetensors")
    w = {n: p.clone() for n, p in ((q, _weight(bundle, q)), (out, _weight(bundle, out)),
                                    (te_q, bundle.text_encoders[0].get_submodule(te_q).weight))}
    applied = apply_loras(bundle, [(load_lora(tmp_path / "old.safetensors"), 0.5, 2.0)])
    assert applied.unmatched == {}
    torch.testing.assert_close(_weight(bundle, q), w[q] + 2.0 * (1.0 / 2) * f[q][1] @ f[q][0])
    torch.testing.assert_close(_weight(bundle, out), w[out] + 2.0 * f[out][1] @ f[out][0])  # no alpha: scale 1
    torch.testing.assert_close(bundle.text_encoders[0].get_submodule(te_q).weight, w[te_q] + 0.5 * f[te_q][1] @ f[te_q][0])


def test_pt_file_equals_safetensors(tmp_path, tiny):
    bundle = tiny("sd1")
    sd = _kohya(bundle, unet=False)
    save_safetensors(sd, tmp_path / "x.safetensors")
    torch.save(sd, tmp_path / "x.pt")
    a, b = _merged_with(bundle, tmp_path / "x.safetensors"), _merged_with(bundle, tmp_path / "x.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- LyCORIS deltas against the formulas

CONV = "input_blocks.1.0.in_layers.2"  # 3x3, 32 -> 32
LINEAR = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # 32 -> 32
KCONV = "lora_unet_down_blocks_0_resnets_0_conv1"
KLINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _merged_delta(tmp_path, bundle, sd: dict, path: str, multiplier: float = 0.5) -> torch.Tensor:
    before = _weight(bundle, path).clone()
    save_safetensors(sd, tmp_path / "lyco.safetensors")
    with apply_loras(bundle, [(load_lora(tmp_path / "lyco.safetensors"), 1.0, multiplier)]):
        return (_weight(bundle, path) - before) / multiplier


def test_locon_3x3_is_the_two_convolutions(tmp_path, tiny):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, 3, 3, generator=g), torch.randn(32, 4, 1, 1, generator=g)
    delta = _merged_delta(tmp_path, tiny("sd1"), {f"{KCONV}.lora_down.weight": down, f"{KCONV}.lora_up.weight": up,
                                     f"{KCONV}.alpha": torch.tensor(8.0)}, CONV)
    x = torch.randn(1, 32, 8, 8, generator=g)
    # LoCon's forward is up(down(x)); the merged delta must be that convolution, times alpha / rank.
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), 2.0 * F.conv2d(F.conv2d(x, down, padding=1), up),
                               atol=1e-4, rtol=1e-4)


def test_locon_tucker_mid_is_the_three_convolutions(tmp_path, tiny):
    g = torch.Generator().manual_seed(1)
    down, mid, up = (torch.randn(4, 32, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g),
                     torch.randn(32, 4, 1, 1, generator=g))
    delta = _merged_delta(tmp_path, tiny("sd1"), {f"{KCONV}.lora_down.weight": down, f"{KCONV}.lora_mid.weight": mid,
                                     f"{KCONV}.lora_up.weight": up, f"{KCONV}.alpha": torch.tensor(4.0)}, CONV)
    x = torch.randn(1, 32, 8, 8, generator=g)
    expected = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), expected, atol=1e-4, rtol=1e-4)


def test_loha(tmp_path, tiny):
    g = torch.Generator().manual_seed(2)
    r = 3
    w1a, w1b, w2a, w2b = (torch.randn(32, r, generator=g), torch.randn(r, 32, generator=g),
                          torch.randn(32, r, generator=g), torch.randn(r, 32, generator=g))
    delta = _merged_delta(tmp_path, tiny("sd1"), {f"{KLINEAR}.hada_w1_a": w1a, f"{KLINEAR}.hada_w1_b": w1b,
                                     f"{KLINEAR}.hada_w2_a": w2a, f"{KLINEAR}.hada_w2_b": w2b,
                                     f"{KLINEAR}.alpha": torch.tensor(1.5)}, LINEAR)
    torch.testing.assert_close(delta, (1.5 / r) * (w1a @ w1b) * (w2a @ w2b), atol=1e-4, rtol=1e-4)


def test_loha_conv_with_tucker(tmp_path, tiny):
    g = torch.Generator().manual_seed(3)
    r = 2
    t1, t2 = torch.randn(r, r, 3, 3, generator=g), torch.randn(r, r, 3, 3, generator=g)
    w1a, w1b, w2a, w2b = (torch.randn(r, 32, generator=g) for _ in range(4))  # (rank, out) and (rank, in)
    delta = _merged_delta(tmp_path, tiny("sd1"), {f"{KCONV}.hada_t1": t1, f"{KCONV}.hada_t2": t2, f"{KCONV}.hada_w1_a": w1a,
                                     f"{KCONV}.hada_w1_b": w1b, f"{KCONV}.hada_w2_a": w2a, f"{KCONV}.hada_w2_b": w2b},
                          CONV)
    # LyCORIS rebuild_tucker: W[o, i, k, l] = sum_ab t[a, b, k, l] wa[a, o] wb[b, i]
    expected = torch.einsum("abkl,ao,bi->oikl", t1, w1a, w1b) * torch.einsum("abkl,ao,bi->oikl", t2, w2a, w2b)
    torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-4)  # no alpha: scale 1


def test_lokr(tmp_path, tiny):
    g = torch.Generator().manual_seed(4)
    w1 = torch.randn(4, 2, generator=g)
    w2a, w2b = torch.randn(8, 2, generator=g), torch.randn(2, 16, generator=g)
    delta = _merged_delta(tmp_path, tiny("sd1"), {f"{KLINEAR}.lokr_w1": w1, f"{KLINEAR}.lokr_w2_a": w2a,
                                     f"{KLINEAR}.lokr_w2_b": w2b, f"{KLINEAR}.alpha": torch.tensor(1.0)}, LINEAR)
    w2 = w2a @ w2b
    # Kronecker product: W[a * 8 + b, c * 16 + d] = w1[a, c] * w2[b, d]; scale alpha / rank(w2) = 1/2.
    expected = torch.einsum("ac,bd->abcd", w1, w2).reshape(32, 32) * 0.5
    torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-4)


def test_lokr_conv_full_factors_and_full_diff(tmp_path, tiny):
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(2, 4, generator=g), torch.randn(16, 8, 3, 3, generator=g)
    delta = _merged_delta(tmp_path, tiny("sd1"), {f"{KCONV}.lokr_w1": w1, f"{KCONV}.lokr_w2": w2,
                                     f"{KCONV}.alpha": torch.tensor(7.0)}, CONV)
    # Both factors whole: no rank, so alpha does not scale (the web UI's rule).
    expected = torch.einsum("ac,bdkl->abcdkl", w1, w2).reshape(32, 32, 3, 3)
    torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-4)

    diff = torch.randn(32, 32, generator=g)
    torch.testing.assert_close(_merged_delta(tmp_path, tiny("sd1"), {f"{KLINEAR}.diff": diff}, LINEAR), diff, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- applying several, multipliers, dyn


def test_several_loras_with_their_own_multipliers(tmp_path, tiny):
    bundle = tiny("sd1")
    save_safetensors(_kohya(bundle, seed=1), tmp_path / "a.safetensors")
    save_safetensors(_kohya(bundle, seed=2, alpha=4.0), tmp_path / "b.safetensors")
    a, b = load_lora(tmp_path / "a.safetensors"), load_lora(tmp_path / "b.safetensors")
    w = _weight(bundle, LINEAR).clone()
    te = _snapshot(bundle)
    applied = apply_loras(bundle, [LoraUse(a, 0.0, 0.5), LoraUse(b, 0.0, -1.0)])
    da = next(m for m in a.modules if m.key == KLINEAR)
    db = next(m for m in b.modules if m.key == KLINEAR)
    expected = w + 0.5 * 0.5 * da.delta() - 1.0 * 1.0 * db.delta()
    torch.testing.assert_close(_weight(bundle, LINEAR), expected, atol=1e-6, rtol=1e-6)
    # Text-encoder multiplier 0: the text encoder is not touched at all.
    assert not applied.touched_text_encoders and applied.touched_unet
    for k, v in bundle.text_encoders[0].state_dict().items():
        assert torch.equal(v, te["cond_stage_model.transformer." + k])


def test_dyn_dim_uses_the_first_ranks(tmp_path, tiny):
    bundle = tiny("sd1")
    original = _weight(bundle, LINEAR).clone()
    sd = _kohya(bundle, te=False, rank=4, alpha=2.0)
    save_safetensors(sd, tmp_path / "full.safetensors")
    truncated = {k: (v[:2] if k.endswith("lora_down.weight") else v[:, :2] if k.endswith("lora_up.weight") else v)
                 for k, v in sd.items()}
    lora = load_lora(tmp_path / "full.safetensors")
    apply_loras(bundle, [LoraUse(lora, 1.0, 1.0, dyn_dim=2)])
    # The scale stays alpha / (full rank), as in the web UI.
    expected = original + 0.5 * truncated[f"{KLINEAR}.lora_up.weight"] @ truncated[f"{KLINEAR}.lora_down.weight"]
    torch.testing.assert_close(_weight(bundle, LINEAR), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- exact restore, bad input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_is_bit_exact(tmp_path, dtype):
    bundle = tiny_bundle("sd2")  # OpenCLIP: row slices of in_proj_weight too
    for net in bundle.networks().values():
        net.to(dtype)
    save_safetensors(_kohya(bundle), tmp_path / "x.safetensors")
    g = torch.Generator().manual_seed(0)
    save_safetensors({f"{KCONV}.hada_w1_a": torch.randn(64, 2, generator=g), f"{KCONV}.hada_w1_b": torch.randn(2, 576, generator=g),
                      f"{KCONV}.hada_w2_a": torch.randn(64, 2, generator=g), f"{KCONV}.hada_w2_b": torch.randn(2, 576, generator=g)},
                     tmp_path / "loha.safetensors")
    snapshot = _snapshot(bundle)
    loras = [(load_lora(tmp_path / "x.safetensors"), 1.0, 1.0), (load_lora(tmp_path / "loha.safetensors"), 1.0, 0.3)]
    with apply_loras(bundle, loras) as applied:
        assert applied.unmatched == {}
        changed = sum(not torch.equal(v, snapshot[k]) for k, v in bundle.state_dict().items())
        assert changed > 50
        assert bundle.unet.get_submodule(CONV).weight.dtype == dtype
    assert applied.restored
    _assert_unchanged(bundle, snapshot)


def test_lora_on_packed_conv_weights(tmp_path):
    """A bundle prepared for the CPU keeps its convolution weights packed (perf.prepare_for_inference):
    LoRAs merge into them as into plain ones, and restore puts the packed originals back."""
    from sdlab import perf
    from sdlab.models.layers import cpu_packing_supported

    if not cpu_packing_supported(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN convolutions")
    plain, packed = tiny_bundle("sd1"), tiny_bundle("sd1")
    perf.prepare_for_inference(plain, "cpu", torch.float32, pack_weights=False)
    perf.prepare_for_inference(packed, "cpu", torch.float32, pack_weights=True)
    assert packed.unet.get_submodule(CONV).weight.is_mkldnn
    save_safetensors(_kohya(plain), tmp_path / "x.safetensors")
    lora = load_lora(tmp_path / "x.safetensors")
    snapshot = _snapshot(packed)
    x, t, ctx, _ = _inputs(plain)
    with torch.no_grad(), apply_loras(plain, [(lora, 1.0, 0.7)]), apply_loras(packed, [(lora, 1.0, 0.7)]):
        assert packed.unet.get_submodule(CONV).weight.is_mkldnn
        # (and a channels-last weight stays channels-last: a 3x3 LoCon once failed on one)
        assert plain.unet.get_submodule(CONV).weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(packed.unet(x, t, ctx), plain.unet(x, t, ctx))
        merged, ref = packed.state_dict(), plain.state_dict()
        assert all(torch.equal(merged[k], ref[k]) for k in ref)
    assert packed.unet.get_submodule(CONV).weight.is_mkldnn
    _assert_unchanged(packed, snapshot)


def test_shape_mismatch_changes_nothing(tmp_path, tiny):
    bundle = tiny("sd1")
    sd = _kohya(bundle)
    # Last in the file, so a loader that merged as it went would already have changed the others.
    bad = "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"
    sd[f"{bad}.lora_down.weight"] = torch.randn(4, 1024)  # SD2's context width
    save_safetensors(sd, tmp_path / "for_sd2.safetensors", {"ss_base_model_version": "sd_v2"})
    snapshot = _snapshot(bundle)
    with pytest.raises(SdlabError) as e:
        apply_loras(bundle, [(load_lora(_kohya_file(tmp_path, bundle)), 1, 1), (load_lora(tmp_path / "for_sd2.safetensors"), 1, 1)])
    msg = str(e.value)
    assert "for_sd2" in msg and bad in msg and "(32, 1024)" in msg and "(32, 64)" in msg and "sd_v2" in msg
    assert "\n" not in msg
    _assert_unchanged(bundle, snapshot)

    # A whole LoRA of another family: SD1 file on an SD2 model.
    sd2 = tiny("sd2")
    snapshot = _snapshot(sd2)
    with pytest.raises(SdlabError, match="another model family"):
        apply_loras(sd2, [(load_lora(_kohya_file(tmp_path, bundle)), 1, 1)])
    _assert_unchanged(sd2, snapshot)


def _kohya_file(tmp_path: Path, bundle, **kw) -> Path:
    path = tmp_path / "good.safetensors"
    save_safetensors(_kohya(bundle, **kw), path)
    return path


def test_unmatched_keys_are_reported_by_name(tmp_path, caplog, tiny):
    bundle = tiny("sd1")
    sd = _kohya(bundle, te=False)
    sd["lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight"] = torch.randn(4, 32)
    sd["lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight"] = torch.randn(32, 4)
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(4, 64)  # SDXL's second encoder
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(128, 4)
    sd["lora_unet_down_blocks_0_attentions_0_proj_out.on_input"] = torch.randn(32)  # IA3: not supported
    save_safetensors(sd, tmp_path / "odd.safetensors")
    with caplog.at_level(logging.WARNING, logger="sdlab.lora"):
        applied = apply_loras(bundle, [(load_lora(tmp_path / "odd.safetensors"), 1, 1)])
    assert sorted(applied.unmatched["odd"]) == ["lora_te2_text_model_encoder_layers_0_mlp_fc1",
                                                "lora_unet_down_blocks_0_attentions_0_proj_out.on_input",
                                                "lora_unet_down_blocks_5_attentions_0_proj_in"]
    lines = [r.getMessage() for r in caplog.records if r.name == "sdlab.lora"]
    assert len(lines) == 1 and "odd" in lines[0] and "lora_unet_down_blocks_5_attentions_0_proj_in" in lines[0]


def test_bad_files(tmp_path, tiny):
    bundle = tiny("sd1")
    cases = {
        "model": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "model checkpoint"),
        "embedding": ({"emb_params": torch.zeros(1, 64)}, "embedding"),
        "nothing": ({"foo.bar": torch.zeros(1)}, "no LoRA weights"),
        "half": ({f"{KLINEAR}.lora_down.weight": torch.zeros(4, 32)}, "missing lora_up.weight"),
        "dora": ({f"{KLINEAR}.lora_down.weight": torch.zeros(4, 32), f"{KLINEAR}.lora_up.weight": torch.zeros(32, 4),
                  f"{KLINEAR}.dora_scale": torch.ones(32, 1)}, "DoRA"),
        "ranks": ({f"{KLINEAR}.lora_down.weight": torch.zeros(4, 32), f"{KLINEAR}.lora_up.weight": torch.zeros(32, 3)},
                  "do not fit"),
    }
    for name, (sd, message) in cases.items():
        save_safetensors(sd, tmp_path / f"{name}.safetensors")
        with pytest.raises(SdlabError, match=message):
            load_lora(tmp_path / f"{name}.safetensors")
    # Nothing of an SDXL-only LoRA matches an SD1 model: one clear error, not a silent no-op.
    save_safetensors({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
                      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)},
                     tmp_path / "xl.safetensors")
    with pytest.raises(SdlabError, match="none of its 1 modules match"):
        apply_loras(bundle, [(load_lora(tmp_path / "xl.safetensors"), 1, 1)])
    with pytest.raises(SdlabError, match="no such file"):
        load_lora(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- the pipeline's state


def test_lora_state_merges_only_on_change(tmp_path, monkeypatch, tiny):
    import sdlab.lora as lora_module

    bundle = tiny("sd1")
    _kohya_file(tmp_path, bundle)  # good.safetensors, named by the prompt below
    snapshot = _snapshot(bundle)
    calls = []
    real = lora_module.apply_loras
    monkeypatch.setattr(lora_module, "apply_loras", lambda *a, **k: calls.append(1) or real(*a, **k))

    state = LoraState()
    text, networks = extract_extra_networks("a cat <lora:good:0.8> <lora:good:te=0:unet=0.5>")
    assert text == "a cat  "
    specs = lora_specs(networks, lambda name: tmp_path / f"{name}.safetensors")
    assert specs[0] == LoraSpec("good", tmp_path / "good.safetensors", 0.8, 0.8)
    state.set(bundle, specs[:1])
    te0, unet0 = state.te_version, state.unet_version
    assert te0 > 0 and unet0 > 0 and len(calls) == 1
    once = _snapshot(bundle)
    state.set(bundle, specs[:1])  # same request: nothing to do
    assert len(calls) == 1 and state.te_version == te0
    _assert_unchanged(bundle, once)

    state.set(bundle, specs[1:])  # te multiplier 0: text encoder back to the original
    assert len(calls) == 2 and state.te_version > te0
    te_key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(bundle.state_dict()[te_key], snapshot[te_key])
    state.set(bundle, [])
    assert state.applied is None
    _assert_unchanged(bundle, snapshot)

    # A request that fails leaves the model with its original weights.
    state.set(bundle, specs[:1])
    save_safetensors({f"{KLINEAR}.lora_down.weight": torch.zeros(4, 999), f"{KLINEAR}.lora_up.weight": torch.zeros(32, 4)},
                     tmp_path / "bad.safetensors")
    with pytest.raises(SdlabError):
        state.set(bundle, [LoraSpec("bad", tmp_path / "bad.safetensors")])
    _assert_unchanged(bundle, snapshot)
    with pytest.raises(SdlabError, match="not a file"):
        state.set(bundle, [LoraSpec("gone", tmp_path / "gone.safetensors")])


# ---------------------------------------------------------------- speed (full size: slow)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_speed_rank128_on_sd15_unet(tmp_path, dtype):
    """Apply + restore a rank-128 kohya LoRA (every transformer layer, as kohya trains) on an
    SD 1.5-shaped UNet; the issue asks for under 2 s on the 2-core CPU machine."""
    import dataclasses
    import time

    from sdlab.checkpoints.loader import Bundle
    from sdlab.models.unet import PRESETS, UNet

    with torch.device("meta"):
        unet = UNet(PRESETS["sd15"])
    unet = unet.to_empty(device="cpu").to(dtype).requires_grad_(False)
    for p in unet.parameters():
        p.zero_()
    cfg = dataclasses.replace(tiny_bundle("sd1").config, unet=PRESETS["sd15"])
    bundle = Bundle(cfg, unet, None, [], [])
    g = torch.Generator().manual_seed(0)
    sd = {}
    for path, m in _layers(unet):
        if ".transformer_blocks." in path or path.endswith(("proj_in", "proj_out")):
            down, up = _factors(m, 128, g, std=0.01)
            name = kohya_name(path, "unet", cfg.unet)
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down.half(), up.half()
            sd[f"{name}.alpha"] = torch.tensor(64.0)
    save_safetensors(sd, tmp_path / "r128.safetensors")
    lora = load_lora(tmp_path / "r128.safetensors")
    touched = sum(unet.get_submodule(native_module_path(m.key, cfg)[1]).weight.numel() for m in lora.modules)
    runs = []
    for _ in range(3):  # the best of three: the first run also pays for fresh memory pages
        start = time.perf_counter()
        applied = apply_loras(bundle, [(lora, 1.0, 1.0)])
        middle = time.perf_counter()
        applied.restore()
        runs.append((middle - start, time.perf_counter() - middle))
    apply_s, restore_s = min(runs, key=sum)
    print(f"rank 128, {len(lora.modules)} modules, {touched / 1e6:.0f}M weights, {dtype}, "
          f"{torch.get_num_threads()} threads: apply {apply_s:.2f} s, restore {restore_s:.3f} s "
          f"(all runs: {', '.join(f'{a + r:.2f}' for a, r in runs)} s)")
    assert apply_s + restore_s < 2.0


def test_merge_lora_command_writes_the_merged_checkpoint(tmp_path, tiny, capsys):
    """`sdlab merge-lora MODEL LORA:RATIO ... -o OUT`: the saved weights are the model's with the
    LoRAs applied at those ratios (the merge itself is proved against diffusers above)."""
    from safetensors import safe_open

    from sdlab.checkpoints.loader import load_bundle
    from sdlab.cli import _lora_and_ratio, main

    from .tiny import save_native

    base = save_native(tiny("sd1"), tmp_path / "base.safetensors")
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_safetensors(_kohya(tiny("sd1"), seed=1), first)
    save_safetensors(_kohya(tiny("sd1"), seed=2, te=False), second)
    out = tmp_path / "merged.safetensors"
    assert main(["merge-lora", str(base), f"{first}:0.5", str(second), "-o", str(out)]) == 0
    assert "2 LoRAs merged" in capsys.readouterr().out

    expected = load_bundle(base, device="cpu", dtype=torch.float32)
    apply_loras(expected, [(load_lora(first), 0.5, 0.5), (load_lora(second), 1.0, 1.0)])
    merged = load_bundle(out, device="cpu", dtype=torch.float32)
    want, got = expected.state_dict(), merged.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any(not torch.equal(want[k], v) for k, v in load_bundle(base, device="cpu").state_dict().items())
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["sdlab.merged_loras"]) == [["a.safetensors", 0.5], ["b.safetensors", 1.0]]

    assert _lora_and_ratio(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert _lora_and_ratio("x.safetensors:-0.25") == ("x.safetensors", -0.25)
    assert main(["merge-lora", str(base), str(first), "-o", str(tmp_path / "merged.ckpt")]) == 1
    assert "must end in .safetensors" in capsys.readouterr().err


def test_info_command_describes_a_lora(tmp_path, tiny, capsys):
    """`sdlab info LORA`: kind, modules per network, ranks, alphas and kohya's training metadata."""
    from sdlab.cli import main

    path = tmp_path / "style.safetensors"
    save_safetensors(_kohya(tiny("sd1"), rank=4, alpha=2.0), path,
                     {"ss_base_model_version": "sd_v1", "ss_steps": "1500", "ss_network_args": "{}"})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    downs = [k for k in _kohya(tiny("sd1")) if k.endswith(".lora_down.weight")]
    n_unet = sum(k.startswith("lora_unet_") for k in downs)
    for line in ["kind  lora", f"modules  UNet {n_unet}, text encoder {len(downs) - n_unet}", "rank  4", "alpha  2",
                 "trained on  sd_v1", "steps  1500"]:
        assert " ".join(line.split()) in " ".join(out.split())
    assert "network args" not in out  # empty metadata is left out
