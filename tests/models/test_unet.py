"""The UNet against diffusers' UNet2DConditionModel on the same random weights.

Our state dict goes through diffusers' own single-file converter (`convert_ldm_unet_checkpoint`)
and is loaded strictly, which proves the key layout of real checkpoints as well as the maths.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

from sdlab.errors import SdlabError
from sdlab.models.unet import PRESETS, FeedForward, UNet, UNetConfig, config_from_state_dict, sdxl_size_embedding

PREFIX = "model.diffusion_model."
POOLED = 32  # pooled text width in the tiny SDXL-style configs

TINY = {
    # SD 1.x: fixed head count, 1x1-conv projections, no attention on the last level (as SD 1.5).
    "sd1-style": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(2, 2), transformer_depth=(1, 0),
                      transformer_depth_middle=1, num_heads=2, context_dim=32, norm_groups=8),
    # SD 2.x: fixed head width, linear projections.
    "sd2-style": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1),
                      transformer_depth_middle=1, num_heads=None, num_head_channels=16, context_dim=24,
                      use_linear_in_transformer=True, norm_groups=16),
    "inpaint-style": UNetConfig(in_channels=9, model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                          transformer_depth=(1, 1), num_heads=4, context_dim=32, norm_groups=8),
    # SDXL base: vector conditioning (6 size numbers), no attention on level 0, depth > 1.
    "sdxl-style": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(2, 2), transformer_depth=(0, 2),
                       transformer_depth_middle=2, num_heads=None, num_head_channels=16, context_dim=32,
                       use_linear_in_transformer=True, adm_in_channels=POOLED + 6 * 256, norm_groups=8),
    # SDXL refiner: 5 numbers (aesthetic score instead of target size), attention only mid-levels.
    "refiner-style": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
                          transformer_depth=(0, 2, 0), transformer_depth_middle=2, num_heads=None,
                          num_head_channels=16, context_dim=40, use_linear_in_transformer=True,
                          adm_in_channels=POOLED + 5 * 256, norm_groups=8),
    # SDXL with another size-embedding width (addition_time_embed_dim 8, as diffusers' tiny SDXL pipelines).
    "sdxl-size-8": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(0, 1),
                              transformer_depth_middle=1, num_heads=None, num_head_channels=16, context_dim=32,
                              use_linear_in_transformer=True, adm_in_channels=POOLED + 6 * 8, size_embed_dim=8,
                              norm_groups=8),
    # No attention in the middle: a single ResBlock (SSD-1B layout, diffusers' "UNetMidBlock2D").
    "no-mid-attn": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1), transformer_depth=(1, 1),
                              transformer_depth_middle=0, num_heads=2, context_dim=32, norm_groups=8),
}

PARAMS = {  # parameter counts of the full presets, equal to diffusers' models of the same configs
    "sd15": 859_520_964, "sd15-inpaint": 859_535_364, "sd21": 865_910_724, "sd21-inpaint": 865_925_124,
    "sdxl": 2_567_463_684, "sdxl-inpaint": 2_567_478_084, "sdxl-refiner": 2_259_526_660,
}


def diffusers_config(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel config of a UNetConfig (as diffusers' create_unet_diffusers_config_from_ldm)."""
    assert len(set(cfg.num_res_blocks)) == 1, "the diffusers converter needs one layers_per_block"
    widths = cfg.level_channels
    attn = [d > 0 for d in cfg.transformer_depth]
    # diffusers' mid block takes its depth from the last entry; entries of attention-free levels are unused.
    layers = [d if d else max(cfg.transformer_depth_middle, 1) for d in cfg.transformer_depth]
    assert not cfg.transformer_depth_middle or layers[-1] == cfg.transformer_depth_middle
    config = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=widths,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn" if cfg.transformer_depth_middle else "UNetMidBlock2D",
        layers_per_block=cfg.num_res_blocks[0], transformer_layers_per_block=layers,
        # diffusers' "attention_head_dim" means the number of heads (its docs admit it).
        attention_head_dim=cfg.num_heads or [w // cfg.num_head_channels for w in widths],
        cross_attention_dim=cfg.context_dim, use_linear_projection=cfg.use_linear_in_transformer,
        norm_num_groups=cfg.norm_groups,
    )
    if cfg.adm_in_channels is not None:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=cfg.size_embed_dim,
                      projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return config


def random_unet(cfg: UNetConfig, seed: int = 0) -> UNet:
    """Our UNet with every weight random (the zero-initialised output convs included), unit-scale outputs."""
    torch.manual_seed(seed)
    model = UNet(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def diffusers_twin(model: UNet) -> UNet2DConditionModel:
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    config = diffusers_config(model.cfg)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    assert len(converted) == len(checkpoint)
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(converted, strict=True)
    return reference


def inputs(cfg: UNetConfig, size: tuple[int, int] = (16, 16), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, *size, generator=g)
    t = torch.tensor([10.5, 731.25])  # fractional, as samplers in sigma space produce
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    return x, t, context


@torch.no_grad()
def compare(cfg: UNetConfig, size: tuple[int, int] = (16, 16)) -> float:
    model = random_unet(cfg)
    reference = diffusers_twin(model)
    x, t, context = inputs(cfg, size)
    kwargs, y = {}, None
    if cfg.adm_in_channels is not None:
        n_ids = (cfg.adm_in_channels - POOLED) // cfg.size_embed_dim
        pooled = torch.randn(2, POOLED, generator=torch.Generator().manual_seed(2))
        time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]])[:, :n_ids]
        if n_ids == 5:  # refiner: the last number is the aesthetic score
            time_ids[:, 4] = torch.tensor([6.0, 2.5])
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        y = torch.cat([pooled, sdxl_size_embedding(time_ids, cfg.size_embed_dim)], dim=-1)
    ours = model(x, t, context, y)
    theirs = reference(x, t, context, **kwargs).sample
    assert ours.shape == theirs.shape == (2, cfg.out_channels, *size)
    assert ours.abs().mean() > 0.1  # a meaningful, non-degenerate output
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff
    return diff


@pytest.mark.parametrize("name", list(TINY))
def test_matches_diffusers(name):
    compare(TINY[name])


def test_matches_diffusers_on_odd_latent_sizes():
    # Upsample goes to the skip's size: 15 -> 8 -> 4 -> 8 -> 15 (a plain x2 would give 16).
    compare(TINY["refiner-style"], size=(15, 13))


def test_feed_forward_in_slices_matches_diffusers(monkeypatch):
    """Without gradients the feed-forward runs the tokens in slices (FeedForward.CHUNK_BYTES);
    at these tiny sizes it would not slice, so make the slices small: 64 rows of 512 tokens."""
    monkeypatch.setattr(FeedForward, "CHUNK_BYTES", 1024)
    compare(TINY[next(iter(TINY))])
    compare(TINY["refiner-style"], size=(15, 13))


def test_sdxl_size_embedding_shape():
    emb = sdxl_size_embedding(torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]), PRESETS["sdxl"].size_embed_dim)
    assert emb.shape == (1, 6 * 256) and emb.dtype == torch.float32
    # 1280 pooled + 6 * 256 = the adm width of SDXL base; 5 numbers for the refiner.
    assert 1280 + emb.shape[1] == PRESETS["sdxl"].adm_in_channels
    assert 1280 + 5 * 256 == PRESETS["sdxl-refiner"].adm_in_channels


def test_keys_are_the_single_file_keys():
    keys = set(UNet(TINY["sd1-style"]).state_dict())
    for key in ["time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
                "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.0.bias",
                "input_blocks.1.0.out_layers.3.weight", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.1.1.norm.weight", "input_blocks.1.1.proj_in.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias",
                "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
                "input_blocks.1.1.transformer_blocks.0.norm3.weight", "input_blocks.1.1.proj_out.weight",
                "input_blocks.3.0.op.weight", "middle_block.0.in_layers.0.weight", "middle_block.1.proj_in.weight",
                "middle_block.2.out_layers.3.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.1.proj_out.bias", "out.0.weight", "out.2.bias"]:
        assert key in keys, key
    assert not any(k.startswith("label_emb") for k in keys)
    assert {"label_emb.0.0.weight", "label_emb.0.2.bias"} <= set(UNet(TINY["sdxl-style"]).state_dict())
    assert UNet(TINY["sd2-style"]).state_dict()["input_blocks.1.1.proj_in.weight"].ndim == 2
    assert not any(k.startswith("middle_block.1") for k in UNet(TINY["no-mid-attn"]).state_dict())


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = UNet(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_presets_are_the_released_configs():
    sd15, sd21, sdxl, refiner = (PRESETS[n] for n in ("sd15", "sd21", "sdxl", "sdxl-refiner"))
    assert (sd15.num_heads, sd15.context_dim, sd15.transformer_depth) == (8, 768, (1, 1, 1, 0))
    assert (sd21.num_head_channels, sd21.context_dim, sd21.use_linear_in_transformer) == (64, 1024, True)
    assert PRESETS["sd15-inpaint"].in_channels == PRESETS["sd21-inpaint"].in_channels == 9
    assert (sdxl.channel_mult, sdxl.transformer_depth, sdxl.transformer_depth_middle) == ((1, 2, 4), (0, 2, 10), 10)
    assert (sdxl.context_dim, sdxl.adm_in_channels) == (2048, 2816)
    assert refiner.model_channels == 384
    assert (refiner.transformer_depth, refiner.transformer_depth_middle) == ((0, 4, 4, 0), 4)
    assert (refiner.context_dim, refiner.adm_in_channels) == (1280, 2560)


@pytest.mark.parametrize("cfg", list(PRESETS.values()) + list(TINY.values()), ids=list(PRESETS) + list(TINY))
def test_config_from_state_dict_round_trip(cfg):
    with torch.device("meta"):
        model = UNet(cfg)
    shapes = {PREFIX + k: v.shape for k, v in model.state_dict().items()}
    shapes["first_stage_model.encoder.conv_in.weight"] = (128, 3, 3, 3)  # other parts of the file are ignored
    read = config_from_state_dict(shapes, num_heads=cfg.num_heads, num_head_channels=cfg.num_head_channels,
                                  prefix=PREFIX)
    # norm_groups cannot be read from shapes; real checkpoints all use 32. The size-embedding
    # width needs the pooled text width as well: families.model_config derives it.
    assert read == UNetConfig(**{**cfg.__dict__, "norm_groups": 32, "size_embed_dim": 256})


def test_config_from_state_dict_errors():
    with pytest.raises(SdlabError, match="no LDM UNet"):
        config_from_state_dict({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, num_heads=8)
    shapes = {k: v.shape for k, v in UNet(TINY["sd1-style"]).state_dict().items()}
    with pytest.raises(SdlabError, match="num_heads"):
        config_from_state_dict(shapes)  # neither heads nor head width given
    # A distilled UNet with one transformer block dropped from the up path.
    pruned = {k: v for k, v in shapes.items() if not k.startswith("output_blocks.3.1.")}
    with pytest.raises(SdlabError, match="differ from block to block"):
        config_from_state_dict(pruned, num_heads=2)


@pytest.mark.parametrize("change, message", [
    (dict(num_res_blocks=(2, 2, 2)), "one entry per level"),
    (dict(num_heads=8, num_head_channels=64), "exactly one"),
    (dict(num_heads=None), "exactly one"),
    (dict(norm_groups=24), "norm_groups"),
    (dict(num_heads=7), "must divide the attention width"),
    (dict(transformer_depth=(1, 1, -1, 0)), ">= 0"),
])
def test_config_validation(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**PRESETS["sd15"].__dict__, **change})


def test_lists_become_tuples():
    cfg = UNetConfig(channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 0])
    assert cfg == PRESETS["sd15"] and hash(cfg) == hash(PRESETS["sd15"])


def test_y_is_required_exactly_for_adm_configs():
    model = random_unet(TINY["sdxl-style"])
    x, t, context = inputs(TINY["sdxl-style"])
    with pytest.raises(ValueError, match="adm_in_channels"):
        model(x, t, context)
    with pytest.raises(ValueError, match="adm_in_channels"):
        random_unet(TINY["sd1-style"])(*inputs(TINY["sd1-style"]), y=torch.zeros(2, 4))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_unet(TINY["sd2-style"]).train()
    x, t, context = inputs(TINY["sd2-style"])
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(x, t, context).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_low_precision_weights_take_fp32_inputs():
    model = random_unet(TINY["sd1-style"])
    x, t, context = inputs(TINY["sd1-style"])
    reference = model(x, t, context)
    out = model.to(torch.bfloat16)(x, t, context)
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()


@torch.no_grad()
def test_scalar_timestep_is_broadcast():
    model = random_unet(TINY["sd1-style"])
    x, _, context = inputs(TINY["sd1-style"])
    torch.testing.assert_close(model(x, torch.tensor(500.0), context), model(x, torch.full((2,), 500.0), context))


# The unet / network_config params of the original yaml files (CompVis v1-inference, runwayml
# v1-inpainting-inference, Stability-AI/stablediffusion v2-inference(-v) / v2-inpainting-inference,
# Stability-AI/generative-models sd_xl_base / sd_xl_refiner).
_SD1 = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
            channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True, transformer_depth=1,
            context_dim=768, legacy=False)
_SD2 = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
            channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
            use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, legacy=False)
ORIGINAL_YAML = {
    "sd15": _SD1, "sd15-inpaint": {**_SD1, "in_channels": 9}, "sd21": _SD2, "sd21-inpaint": {**_SD2, "in_channels": 9},
    "sdxl": dict(adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
                 attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
                 use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[1, 2, 10],
                 context_dim=2048, legacy=False),
    "sdxl-refiner": dict(adm_in_channels=2560, num_classes="sequential", in_channels=4, out_channels=4,
                         model_channels=384, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
                         num_head_channels=64, use_linear_in_transformer=True, transformer_depth=4,
                         context_dim=[1280, 1280, 1280, 1280]),
}


def attention_heads(model: torch.nn.Module, prefixes: tuple[str, ...]) -> list[int]:
    return [m.heads for prefix in prefixes for n, m in model.named_modules()
            if n.startswith(prefix) and n.endswith("attn1")]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ORIGINAL_YAML))
def test_presets_match_the_original_yaml_through_diffusers(name):
    original = {"model": {"params": {"unet_config": {"params": ORIGINAL_YAML[name]},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    with torch.device("meta"):
        ours = UNet(PRESETS[name])
        reference = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    # Heads are invisible in shapes: compare every attention layer's head count, in order.
    assert attention_heads(ours, ("input_blocks", "middle_block", "output_blocks")) == \
        attention_heads(reference, ("down_blocks", "mid_block", "up_blocks"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_full_presets_have_the_diffusers_keys_and_shapes(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        ours = UNet(cfg)
        config = diffusers_config(cfg)
        reference = UNet2DConditionModel(**config)
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == PARAMS[name]
    print(f"{name}: {count:,} parameters ({count / 1e6:.2f} M)")
