"""The ControlNet against diffusers' ControlNetModel on the same random weights, and our UNet fed
its residuals against diffusers' UNet2DConditionModel fed diffusers' residuals.

Our state dict, with the released files' `control_model.` prefix, goes through diffusers' own
single-file converter (`convert_controlnet_checkpoint`) and is loaded strictly. Every weight is
perturbed first: the zero convolutions (and the hint encoder's last conv) start at zero, and a
fresh ControlNet's residuals are exactly 0, which would prove nothing.
"""

from dataclasses import replace

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

from sdlab.checkpoints.io import save_safetensors
from sdlab.controlnet import check_compatible, control_file_info, control_kind, inspect_control_file, load_controlnet
from sdlab.controlnet.loading import controlnet_to_diffusers
from sdlab.errors import SdlabError
from sdlab.models.controlnet import PRESETS, ControlNet, ControlNetConfig, config_from_state_dict
from sdlab.models.unet import ControlResiduals, UNetConfig, sdxl_size_embedding
from tests.models.test_unet import POOLED, TINY, diffusers_config, diffusers_twin, inputs, random_unet
from tests.tiny import tiny_config

TINY_CN = {
    "sd1-style": ControlNetConfig(TINY["sd1-style"]),
    "sdxl-style": ControlNetConfig(TINY["sdxl-style"]),
    # SDXL "small": no attention in the levels, a SpatialTransformer without blocks in the middle.
    "sdxl-small-style": ControlNetConfig(
        replace(TINY["sdxl-style"], transformer_depth=(0, 0), transformer_depth_middle=0),
        middle_transformer_without_blocks=True),
}


def diffusers_controlnet_config(cfg: ControlNetConfig) -> dict:
    """diffusers' ControlNetModel config of ours (as its create_controlnet_diffusers_config_from_ldm)."""
    unet = diffusers_config(cfg.unet)
    keep = ("in_channels", "down_block_types", "mid_block_type", "block_out_channels", "layers_per_block",
            "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
            "norm_num_groups", "addition_embed_type", "addition_time_embed_dim",
            "projection_class_embeddings_input_dim")
    config = {k: unet[k] for k in keep if k in unet}
    if cfg.middle_transformer_without_blocks:  # diffusers' cross-attention mid block with 0 layers
        config.update(mid_block_type="UNetMidBlock2DCrossAttn",
                      transformer_layers_per_block=[0] * len(unet["block_out_channels"]))
    config.update(conditioning_channels=cfg.hint_channels, conditioning_embedding_out_channels=cfg.hint_block_channels,
                  global_pool_conditions=cfg.global_average_pooling)
    return config


def random_controlnet(cfg: ControlNetConfig, seed: int = 0) -> ControlNet:
    """Our ControlNet with every weight random, the zero-initialised convs included."""
    torch.manual_seed(seed)
    model = ControlNet(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Large enough that the residuals are unit-scale, not a rounding error.
            scale = 0.3 if name.startswith(("zero_convs", "middle_block_out")) else 0.05
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def diffusers_controlnet(model: ControlNet) -> ControlNetModel:
    checkpoint = {"control_model." + k: v for k, v in model.state_dict().items()}
    config = diffusers_controlnet_config(model.cfg)
    converted = convert_controlnet_checkpoint(checkpoint, {"layers_per_block": config["layers_per_block"]})
    # diffusers' converter leaves SDXL's label_emb out; its own table names the keys.
    for theirs, ours in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if "control_model." + ours in checkpoint:
            converted[theirs] = checkpoint["control_model." + ours]
    assert len(converted) == len(checkpoint)
    reference = ControlNetModel(**config).eval()
    reference.load_state_dict(converted, strict=True)
    return reference


def conditioning(cfg: UNetConfig, seed: int = 2):
    """(our y, diffusers' added_cond_kwargs) for an SDXL-style config; (None, {}) otherwise."""
    if cfg.adm_in_channels is None:
        return None, {}
    pooled = torch.randn(2, POOLED, generator=torch.Generator().manual_seed(seed))
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]])
    y = torch.cat([pooled, sdxl_size_embedding(time_ids, cfg.size_embed_dim)], dim=-1)
    return y, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def hint_for(size: tuple[int, int], channels: int = 3, seed: int = 3) -> torch.Tensor:
    return torch.rand(2, channels, 8 * size[0], 8 * size[1], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(TINY_CN))
@torch.no_grad()
def test_controlnet_and_controlled_unet_match_diffusers(name):
    cfg = TINY_CN[name]
    size = (8, 8)
    ours_cn = random_controlnet(cfg)
    theirs_cn = diffusers_controlnet(ours_cn)
    x, t, context = inputs(cfg.unet, size)
    hint = hint_for(size, cfg.hint_channels)
    y, kwargs = conditioning(cfg.unet)

    control = ours_cn(x, hint, t, context, y)
    down, mid = theirs_cn(x, t, context, hint, return_dict=False, **kwargs)
    assert len(control.skips) == len(down) == cfg.num_residuals
    for a, b in zip((*control.skips, control.middle), (*down, mid)):
        assert a.shape == b.shape
        assert a.abs().mean() > 0.05  # the residuals are not (near) zero: the test sees the hint path
        assert (a - b).abs().max().item() < 1e-4

    # The full loop: our UNet with our residuals, diffusers' UNet with diffusers' residuals.
    unet = random_unet(cfg.unet, seed=5)
    reference = diffusers_twin(unet)
    ours = unet(x, t, context, y, control=control)
    theirs = reference(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                       **kwargs).sample
    plain = unet(x, t, context, y)
    assert (ours - plain).abs().mean() > 0.05  # the control changes the prediction
    assert (ours - theirs).abs().max().item() < 1e-4


@torch.no_grad()
def test_no_control_is_the_plain_unet_bit_for_bit():
    cfg = TINY["sd1-style"]
    unet = random_unet(cfg)
    x, t, context = inputs(cfg)
    zeros = ControlNet(ControlNetConfig(cfg)).eval()(x, hint_for((16, 16)), t, context)  # fresh: zero residuals
    assert all(not r.any() for r in (*zeros.skips, zeros.middle))
    plain = unet(x, t, context)
    assert torch.equal(unet(x, t, context, control=None), plain)
    assert torch.equal(unet(x, t, context, control=zeros), plain)


@torch.no_grad()
def test_residuals_add_and_scale():
    a = ControlResiduals((torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2)), torch.ones(1, 2, 2, 2))
    b = (a + a).scaled([0.5, 0.25, 2.0])
    assert b.skips[0].unique().tolist() == [1.0] and b.skips[1].unique().tolist() == [0.5]
    assert b.middle.unique().tolist() == [4.0]
    assert a.scaled(3).middle.unique().tolist() == [3.0]
    with pytest.raises(ValueError):
        a.scaled([1.0, 2.0])
    cfg = TINY["sd1-style"]
    unet = random_unet(cfg)
    x, t, context = inputs(cfg)
    with pytest.raises(ValueError, match="skip residuals"):
        unet(x, t, context, control=a)


@torch.no_grad()
def test_global_average_pooling_matches_diffusers_global_pool_conditions():
    cfg = replace(TINY_CN["sd1-style"], global_average_pooling=True)
    ours_cn = random_controlnet(cfg)
    theirs_cn = diffusers_controlnet(ours_cn)
    x, t, context = inputs(cfg.unet, (8, 8))
    hint = hint_for((8, 8))
    control = ours_cn(x, hint, t, context)
    down, mid = theirs_cn(x, t, context, hint, return_dict=False)
    assert control.middle.shape[-2:] == (1, 1)
    for a, b in zip((*control.skips, control.middle), (*down, mid)):
        assert (a - b).abs().max().item() < 1e-4


def test_hint_must_be_eight_times_the_latent():
    cfg = TINY_CN["sd1-style"]
    x, t, context = inputs(cfg.unet, (8, 8))
    with pytest.raises(ValueError, match="8x"):
        ControlNet(cfg)(x, torch.zeros(2, 3, 32, 32), t, context)


def test_keys_are_the_released_files_keys():
    with torch.device("meta"):
        keys = set(ControlNet(PRESETS["sd15"]).state_dict())
        xl = set(ControlNet(PRESETS["sdxl"]).state_dict())
        small = set(ControlNet(PRESETS["sdxl-small"]).state_dict())
    for key in ["time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight",
                "input_blocks.11.0.out_layers.3.weight", "middle_block.2.in_layers.0.weight",
                "input_hint_block.0.weight", "input_hint_block.14.bias", "zero_convs.0.0.weight",
                "zero_convs.11.0.bias", "middle_block_out.0.weight"]:
        assert key in keys, key
    assert not any(k.startswith(("output_blocks", "out.", "label_emb")) for k in keys)
    assert {"label_emb.0.0.weight", "zero_convs.8.0.weight", "input_blocks.8.1.transformer_blocks.9.norm3.weight"} <= xl
    assert "zero_convs.9.0.weight" not in xl
    assert "middle_block.1.proj_in.weight" in small and not any("transformer_blocks" in k for k in small)
    assert [PRESETS[n].num_residuals for n in ("sd15", "sd21", "sdxl")] == [12, 12, 9]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_equal_diffusers(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = sum(p.numel() for p in ControlNet(cfg).parameters())
        theirs = sum(p.numel() for p in ControlNetModel(**diffusers_controlnet_config(cfg)).parameters())
    assert ours == theirs


@pytest.mark.parametrize("name", list(PRESETS) + list(TINY_CN))
def test_config_from_state_dict_round_trip(name):
    cfg = PRESETS.get(name) or TINY_CN[name]
    with torch.device("meta"):
        sd = ControlNet(cfg).state_dict()
    u = cfg.unet
    heads = {"num_heads": u.num_heads} if u.num_heads else {"num_head_channels": u.num_head_channels}
    read = config_from_state_dict({"control_model." + k: v for k, v in sd.items()}, prefix="control_model.", **heads)
    # Not in the shapes: norm_groups (32 in every real file), size_embed_dim (y's width is), and the
    # context width when nothing attends to it.
    assert read.unet.norm_groups == 32
    assert read == replace(cfg, unet=replace(cfg.unet, size_embed_dim=read.unet.size_embed_dim,
                                             context_dim=read.unet.context_dim, norm_groups=32))
    if any(u.transformer_depth) or u.transformer_depth_middle:
        assert read.unet.context_dim == u.context_dim


def test_config_from_state_dict_refuses_what_is_not_a_controlnet():
    with torch.device("meta"):
        sd = ControlNet(TINY_CN["sd1-style"]).state_dict()
    with pytest.raises(SdlabError, match="no ControlNet"):
        config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("zero_convs")}, num_heads=2)
    with pytest.raises(SdlabError, match="zero_convs"):
        config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("zero_convs.3.")}, num_heads=2)


# ---------------------------------------------------------------------------------------------
# Loading the files users have (sdlab.controlnet.loading)
#
# Configs of tests/tiny.py: their heads follow the families' rules (SD 1.x 8 heads, SD 2.x and
# SDXL 64 channels per head) and their norms the released 32 groups, as a file without a
# config.json must.

LOADABLE = {family: ControlNetConfig(tiny_config(family).unet) for family in ("sd1", "sd2", "sdxl")}


def residuals(net: ControlNet, seed: int = 1) -> ControlResiduals:
    cfg = net.cfg.unet
    x, t, context = inputs(cfg, (8, 8), seed)
    y = None
    if cfg.adm_in_channels:
        y = torch.randn(2, cfg.adm_in_channels, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return net(x, hint_for((8, 8)), t, context, y)


def assert_same(a: ControlResiduals, b: ControlResiduals, atol: float = 0.0) -> None:
    for x, y in zip((*a.skips, a.middle), (*b.skips, b.middle), strict=True):
        assert (x - y).abs().max().item() <= atol


def assert_same_weights(net: ControlNet, reference: ControlNet) -> None:
    theirs = reference.state_dict()
    assert net.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("family", list(LOADABLE))
def test_loads_the_original_layout_with_and_without_prefix(tmp_path, family):
    ref = random_controlnet(LOADABLE[family])
    sd = ref.state_dict()
    save_safetensors({"control_model." + k: v for k, v in sd.items()}, tmp_path / "control_v11p_canny.safetensors")
    torch.save(sd, tmp_path / "extracted.pth")
    for name in ("control_v11p_canny.safetensors", "extracted.pth"):
        info = inspect_control_file(tmp_path / name)
        assert (info.kind, info.family) == ("controlnet", family)
        net = load_controlnet(tmp_path / name)
        assert net.cfg == ref.cfg
        assert_same_weights(net, ref)


def test_loads_the_controlnet_inside_a_full_checkpoint(tmp_path):
    """ControlNet 1.0's control_sd15_*.pth: the whole SD model with the ControlNet under control_model."""
    ref = random_controlnet(LOADABLE["sd1"])
    unet = random_unet(LOADABLE["sd1"].unet)
    sd = {"control_model." + k: v for k, v in ref.state_dict().items()}
    sd |= {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save({"state_dict": sd}, tmp_path / "control_sd15_canny.pth")
    assert_same_weights(load_controlnet(tmp_path / "control_sd15_canny.pth", unet=unet), ref)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_keys_convert_as_diffusers_own_converter(tmp_path, family):
    """A diffusers-keyed single file (the diffusers_xl_* files) made by diffusers' converter
    loads as the original; our mapping the other way gives the converter's keys and tensors."""
    ref = random_controlnet(LOADABLE[family])
    theirs = diffusers_controlnet(ref).state_dict()
    ours = controlnet_to_diffusers(ref.state_dict())
    assert ours.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    save_safetensors(theirs, tmp_path / "diffusers_xl_canny_full.safetensors")
    assert inspect_control_file(tmp_path / "diffusers_xl_canny_full.safetensors").kind == "controlnet-diffusers"
    assert_same_weights(load_controlnet(tmp_path / "diffusers_xl_canny_full.safetensors"), ref)


@pytest.mark.parametrize("name", list(TINY_CN))
def test_loads_a_diffusers_folder(tmp_path, name):
    """save_pretrained's folder: heads and norm groups from config.json, residuals as diffusers'."""
    ref = random_controlnet(TINY_CN[name])
    reference = diffusers_controlnet(ref)
    reference.save_pretrained(tmp_path / "cn")
    net = load_controlnet(tmp_path / "cn")
    assert net.cfg.unet.norm_groups == 8 and net.cfg.unet.heads(64) == ref.cfg.unet.heads(64)
    x, t, context = inputs(ref.cfg.unet, (8, 8))
    y, kwargs = conditioning(ref.cfg.unet)
    with torch.no_grad():
        ours = net(x, hint_for((8, 8)), t, context, y)
        down, mid = reference(x, t, context, hint_for((8, 8)), return_dict=False, **kwargs)
    assert_same(ours, ControlResiduals(tuple(down), mid), atol=1e-4)


def test_diff_controlnet_is_added_to_the_loaded_unet(tmp_path):
    """A "diff" file (extract_controlnet_diff.py: UNet-copied layers as differences, unchanged
    ones left out, a `difference` key) gives the full ControlNet it was made from."""
    cfg = LOADABLE["sd1"]
    full, unet = random_controlnet(cfg), random_unet(cfg.unet, seed=3)
    base = unet.state_dict()
    sd = {"difference": torch.tensor(1.0)}
    for k, v in full.state_dict().items():
        sd["control_model." + k] = v - base[k] if k in base else v
    unchanged = "input_blocks.1.0.in_layers.0.weight"
    with torch.no_grad():  # this layer was not trained: the extraction leaves it out
        full.state_dict()[unchanged].copy_(base[unchanged])
    del sd["control_model." + unchanged]
    save_safetensors(sd, tmp_path / "diff_control_sd15_canny.safetensors")
    info = inspect_control_file(tmp_path / "diff_control_sd15_canny.safetensors")
    assert info.describe() == '"diff" ControlNet for SD 1.x'
    with pytest.raises(SdlabError, match="load a checkpoint first"):
        load_controlnet(tmp_path / "diff_control_sd15_canny.safetensors")
    net = load_controlnet(tmp_path / "diff_control_sd15_canny.safetensors", unet=unet)
    # (w - b) + b rounds in the last bit, and the residuals reach ~7: fp32 rounding of that, on any
    # CPU's kernels (AVX2's sum in another order than AVX-512's), stays far inside the 1e-4 of DESIGN.md.
    assert_same(residuals(net), residuals(full), atol=5e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_control_lora_is_the_unet_plus_up_down(tmp_path, family):
    """Stability's Control-LoRA: shared Linear / conv weights as up and down on the loaded UNet's,
    everything else (hint encoder, zero convs, norms, biases) whole."""
    cfg = LOADABLE[family]
    unet = random_unet(cfg.unet, seed=4)
    base = unet.state_dict()
    full = random_controlnet(cfg)
    g = torch.Generator().manual_seed(9)
    sd = {"lora_controlnet": torch.tensor([])}
    with torch.no_grad():
        for name, module in full.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name + ".weight" in base:
                w = module.weight
                up = 0.1 * torch.randn(w.shape[0], 2, *([1, 1] if w.ndim == 4 else []), generator=g)
                down = 0.1 * torch.randn(2, *w.shape[1:], generator=g)
                w.copy_(base[name + ".weight"] + (up.flatten(1) @ down.flatten(1)).reshape(w.shape))
                sd[name + ".up"], sd[name + ".down"] = up, down
        for k, v in full.state_dict().items():
            lora = k.endswith(".weight") and k[:-7] + ".up" in sd
            if not lora:
                sd[k] = v
    save_safetensors(sd, tmp_path / "control-lora-canny-rank2.safetensors")
    info = inspect_control_file(tmp_path / "control-lora-canny-rank2.safetensors")
    assert (info.kind, info.family) == ("control-lora", family)
    assert info.describe().startswith(f"Control-LoRA for {'SD 1.x' if family == 'sd1' else 'SDXL'}")
    net = load_controlnet(tmp_path / "control-lora-canny-rank2.safetensors", unet=unet)
    assert_same(residuals(net), residuals(full), atol=1e-5)


def test_a_controlnet_of_another_family_is_refused(tmp_path):
    save_safetensors(random_controlnet(LOADABLE["sd1"]).state_dict(), tmp_path / "cn15.safetensors")
    sdxl_unet = random_unet(tiny_config("sdxl").unet)
    with pytest.raises(SdlabError, match="ControlNet for SD 1.x and cannot control this SDXL model"):
        load_controlnet(tmp_path / "cn15.safetensors", unet=sdxl_unet)
    with pytest.raises(SdlabError, match="text tokens"):
        check_compatible(LOADABLE["sd1"], replace(LOADABLE["sd1"].unet, context_dim=1024))


def test_file_kinds_and_sdxl_variants(tmp_path):
    with torch.device("meta"):
        shapes = {n: ControlNet(PRESETS[n]).state_dict() for n in PRESETS}
    assert [control_file_info(shapes[n]).describe() for n in PRESETS] == [
        "ControlNet for SD 1.x", "ControlNet for SD 2.x", "ControlNet for SDXL", "ControlNet for SDXL (mid)",
        "ControlNet for SDXL (small)"]
    assert control_kind({"adapter.body.0.resnets.0.block1.weight": 0, "adapter.conv_in.weight": 0}) == "t2i-adapter"
    assert control_kind({"conv_in.weight", "body.0.block1.weight", "body.0.block2.weight"}) == "t2i-adapter"
    assert control_kind({"model.diffusion_model.input_blocks.0.0.weight"}) is None
    save_safetensors({"conv_in.weight": torch.zeros(4, 192, 3, 3), "body.0.block1.weight": torch.zeros(4, 4, 3, 3)},
                     tmp_path / "t2iadapter_canny_sd15v2.safetensors")
    assert inspect_control_file(tmp_path / "t2iadapter_canny_sd15v2.safetensors").describe() == "T2I-Adapter"
    with pytest.raises(SdlabError, match="T2I-Adapter"):
        load_controlnet(tmp_path / "t2iadapter_canny_sd15v2.safetensors")
    save_safetensors({"lora_unet_down.weight": torch.zeros(2, 2)}, tmp_path / "a_lora.safetensors")
    with pytest.raises(SdlabError, match="not a ControlNet"):
        load_controlnet(tmp_path / "a_lora.safetensors")


def test_damaged_files_and_shuffle(tmp_path):
    ref = random_controlnet(LOADABLE["sd1"])
    sd = ref.state_dict()
    cut = {k: v for k, v in sd.items() if k != "middle_block.0.emb_layers.1.bias"}
    save_safetensors(cut, tmp_path / "cut.safetensors")
    with pytest.raises(SdlabError, match="cut.safetensors: ControlNet keys do not match: 1 missing"):
        load_controlnet(tmp_path / "cut.safetensors")
    save_safetensors(sd, tmp_path / "control_v11e_sd15_shuffle.safetensors")
    assert load_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors").cfg.global_average_pooling
    net = load_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors", dtype=torch.float16)
    assert next(net.parameters()).dtype == torch.float16 and not next(net.parameters()).requires_grad
