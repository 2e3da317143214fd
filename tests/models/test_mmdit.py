"""MMDiT: equal to diffusers' SD3Transformer2DModel on the same random weights, loaded through
diffusers' own single-file converter (which proves the checkpoint key layout too), in the three
shapes of the released models: SD3-medium, SD3.5-large (qk RMSNorm), SD3.5-medium (MMDiT-X)."""

from dataclasses import replace

import pytest
import torch

from sdlab.errors import SdlabError
from sdlab.models import storage
from sdlab.models.mmdit import PRESETS, MMDiT, MMDiTConfig, config_from_state_dict

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

ATOL = 1e-4
PREFIX = "model.diffusion_model."
# Like diffusers' own tiny SD3 tests (head width 8, 4 heads), with 3 layers: heads != depth and
# hidden != 64 * depth, so neither of the original's rules can stand in for the config. The
# context (24) and pooled (40) widths differ from hidden (32) so no two shapes can be swapped.
BASE = MMDiTConfig(depth=3, hidden_size=32, heads=4, patch_size=2, in_channels=4, out_channels=4,
                   pos_embed_max_size=10, adm_in_channels=40, context_dim=24)
TINY = {
    "sd3-medium": BASE,
    "sd3.5-large": replace(BASE, qk_norm=True),
    "sd3.5-medium": replace(BASE, qk_norm=True, x_block_self_attn_layers=(0, 1)),
}


def random_model(cfg: MMDiTConfig, seed: int = 0) -> MMDiT:
    """Every tensor drawn at unit scale, adaLN (zero-initialised in diffusers) and pos_embed
    (a zero buffer until loaded) included; qk-norm gains near 1."""
    g = torch.Generator().manual_seed(seed)
    model = MMDiT(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                t.copy_(1 + 0.2 * noise)
            elif name == "pos_embed" or t.ndim == 1:
                t.copy_(0.2 * noise)
            else:
                t.copy_(noise / t[0].numel() ** 0.5)
    return model


def single_file(model: MMDiT) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v.clone() for k, v in model.state_dict().items()}


def diffusers_model(cfg: MMDiTConfig) -> "diffusers.SD3Transformer2DModel":
    return diffusers.SD3Transformer2DModel(
        sample_size=cfg.pos_embed_max_size * cfg.patch_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.context_dim, caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.adm_in_channels, out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=cfg.x_block_self_attn_layers,
        qk_norm="rms_norm" if cfg.qk_norm else None)


@pytest.fixture(scope="module", params=list(TINY))
def pair(request) -> tuple[MMDiT, "diffusers.SD3Transformer2DModel"]:
    cfg = TINY[request.param]
    ours = random_model(cfg)
    ref = diffusers_model(cfg).eval()
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(single_file(ours)), strict=True)
    return ours, ref


def inputs(cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # 5 x 6 patches of a 10 x 10 grid: an off-centre crop (top 2.5 rounds down) that is not square.
    return {"x": torch.randn(2, cfg.in_channels, 10, 12, generator=g),
            "t": torch.tensor([999.0, 3.5]),
            "context": torch.randn(2, 7, cfg.context_dim, generator=g),
            "y": torch.randn(2, cfg.adm_in_channels, generator=g)}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_every_tensor_is_perturbed():
    sd = random_model(TINY["sd3.5-medium"]).state_dict()
    flat = [k for k, v in sd.items() if v.std() == 0 or v.abs().max() == 0]
    assert not flat
    assert "pos_embed" in sd and "joint_blocks.2.context_block.adaLN_modulation.1.weight" in sd


@torch.no_grad()
def test_matches_diffusers(pair):
    ours, ref = pair
    i = inputs(ours.cfg)
    out = ours(i["x"], i["t"], i["context"], i["y"])
    assert out.shape == i["x"].shape
    expected = ref(i["x"], i["context"], i["y"], i["t"]).sample
    assert max_diff(out, expected) < ATOL
    assert expected.abs().mean() > 0.1  # not a washed-out comparison


@torch.no_grad()
def test_packed_weights_give_the_same_output(pair):
    """CPU inference packs the linear weights for oneDNN (`perf.prepare_for_inference`) and runs
    the MLP's GELU inside fc1's product: the same numbers as the plain model, to fp32 rounding."""
    from sdlab.models.layers import cpu_packing_supported, pack_weights_for_cpu, unpack_weights

    if not cpu_packing_supported(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN matrix products")
    ours, _ = pair
    i = inputs(ours.cfg)
    plain = ours(i["x"], i["t"], i["context"], i["y"])
    linears = sum(isinstance(m, torch.nn.Linear) for m in ours.modules())
    try:
        ours.requires_grad_(False)  # inference weights: frozen
        assert pack_weights_for_cpu(ours) == linears
        assert ours.joint_blocks[0].x_block.mlp.fc1.weight.is_mkldnn
        assert max_diff(ours(i["x"], i["t"], i["context"], i["y"]), plain) < 1e-5
    finally:
        unpack_weights(ours)
        ours.requires_grad_(True)


@torch.no_grad()
@pytest.mark.parametrize("skip", [(1,), (0, 2)])  # (0, 2) leaves out the pre-only last layer too
def test_skip_layers_match_diffusers(pair, skip):
    ours, ref = pair
    i = inputs(ours.cfg)
    out = ours(i["x"], i["t"], i["context"], i["y"], skip_layers=skip)
    assert max_diff(out, ref(i["x"], i["context"], i["y"], i["t"], skip_layers=list(skip)).sample) < ATOL
    assert max_diff(out, ours(i["x"], i["t"], i["context"], i["y"])) > 1e-2  # the layers really were skipped


@pytest.mark.parametrize("name", list(TINY))
def test_config_from_state_dict_recovers_the_config(name):
    cfg = TINY[name]
    sd = single_file(random_model(cfg))
    assert config_from_state_dict(sd, PREFIX, heads=cfg.heads) == cfg
    # Shapes alone are enough; with qk-norm the head width is in them, so heads is too.
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if cfg.qk_norm:
        assert config_from_state_dict(shapes, PREFIX) == cfg
    else:  # without, 64 channels per head (all released models), else one head per layer, else ask
        with pytest.raises(SdlabError, match="head count"):
            config_from_state_dict(shapes, PREFIX)
        with torch.device("meta"):
            four_layers = {PREFIX + k: v.shape for k, v in MMDiT(replace(cfg, depth=4)).state_dict().items()}
        assert config_from_state_dict(four_layers, PREFIX) == replace(cfg, depth=4, heads=4)


def test_config_from_state_dict_on_released_shapes():
    """The full-size presets come back from their own shapes, heads included (meta tensors)."""
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in MMDiT(cfg).state_dict().items()}
        assert config_from_state_dict(shapes) == cfg, name
    with pytest.raises(SdlabError, match="no SD3 MMDiT"):
        config_from_state_dict({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, PREFIX)
    del shapes["context_embedder.weight"]
    with pytest.raises(SdlabError, match="missing context_embedder.weight"):
        config_from_state_dict(shapes)


@torch.no_grad()
def test_builds_on_meta_and_loads_with_assign():
    cfg = TINY["sd3.5-medium"]
    ours = random_model(cfg)
    sd = ours.state_dict()
    sd["pos_embed"] = sd["pos_embed"][0]  # as GGUF files store it, without the leading 1
    with torch.device("meta"):
        loaded = MMDiT(config_from_state_dict(sd))
    loaded.load_state_dict(sd, strict=True, assign=True)
    i = inputs(cfg)
    assert torch.equal(loaded.eval()(**i), ours(**i))


@torch.no_grad()
def test_narrow_weights_compute_in_bf16():
    """fp8 weights, computing in bf16 (`storage.set_dtypes`): close to fp32 on the same rounded weights."""
    cfg = TINY["sd3.5-medium"]
    wide = random_model(cfg)
    narrow = storage.set_dtypes(random_model(cfg).requires_grad_(False), torch.bfloat16, torch.float8_e4m3fn)
    assert narrow.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():  # the reference: the fp8-rounded weights, in fp32
        for module, attr in storage.narrowable(wide, torch.float8_e4m3fn).values():
            w = getattr(module, attr)
            w.copy_(w.to(torch.float8_e4m3fn).float())
    i = inputs(cfg)
    out = narrow(**i)
    assert out.dtype == torch.float32  # the input's dtype
    expected = wide(**i)
    assert max_diff(out, expected) < 0.02 * expected.abs().max()  # bf16 rounding; fp8 rounding moves it 7%


def test_rejects_bad_inputs_and_configs():
    model = random_model(TINY["sd3-medium"])
    i = inputs(model.cfg)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(i["x"][..., :9, :], i["t"], i["context"], i["y"])
    with pytest.raises(ValueError, match="larger than the position grid"):
        model(torch.zeros(1, 4, 22, 8), i["t"][:1], i["context"][:1], i["y"][:1])
    with pytest.raises(ValueError, match="skip_layers"):
        model(**i, skip_layers=(3,))
    with pytest.raises(ValueError, match="pooled text"):
        model(i["x"], i["t"], i["context"])
    with pytest.raises(ValueError, match="must divide"):
        replace(BASE, heads=5)
    with pytest.raises(ValueError, match="x_block_self_attn_layers"):
        replace(BASE, x_block_self_attn_layers=(3,))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_full_size_presets_match_diffusers_key_for_key(name):
    """The released configurations on the meta device: through diffusers' converter every tensor
    lands on a tensor of SD3Transformer2DModel's with the same shape, and none is missing."""
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = MMDiT(cfg)
        ref = diffusers_model(cfg)
    sd = ours.state_dict()
    converted = convert_sd3_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in sd.items()})
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)
    params = sum(p.numel() for p in ours.parameters())
    assert params + sd["pos_embed"].numel() == sum(v.numel() for v in ref_sd.values())
    print(f"{name}: {params / 1e6:.1f} M parameters + pos_embed {sd['pos_embed'].numel() / 1e6:.1f} M")
