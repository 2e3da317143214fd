"""AutoencoderKL: parity with diffusers on random weights, through diffusers' own
single-file converter (which proves the key layout of real checkpoints), plus the
full-size SD key set and parameter count on the meta device."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from sdlab.errors import SdlabError
from sdlab.models.vae import PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig, config_from_state_dict

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

ATOL = 1e-4
# Three levels so that the decoder's reversed `up` order, a level without a width change
# (no nin_shortcut) and one with it are all exercised; 32x32 images -> 8x8 latents.
TINY = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, norm_groups=8)


def diffusers_config(cfg: VAEConfig) -> dict:
    n = len(cfg.channel_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": 32,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_quant_conv,
    }


def to_diffusers(ours: AutoencoderKL, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our state dict, saved as a single file would hold it, through diffusers' converter."""
    single_file = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    return convert_ldm_vae_checkpoint(single_file, diffusers_config(cfg))


@pytest.fixture(scope="module")
def models() -> tuple[AutoencoderKL, nn.Module]:
    torch.manual_seed(0)
    ours = AutoencoderKL(TINY).eval()
    with torch.no_grad():
        # Default GroupNorm affine is the identity; perturb it so a misplaced norm would show.
        for module in ours.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    ref = diffusers.AutoencoderKL(**diffusers_config(TINY)).eval()
    ref.load_state_dict(to_diffusers(ours, TINY), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def test_encode_matches_diffusers(models, images):
    ours, ref = models
    post = ours.encode(images)
    ref_post = ref.encode(images).latent_dist
    assert post.mean.shape == (2, 4, 8, 8)
    assert max_diff(post.mean, ref_post.mean) < ATOL
    assert max_diff(post.logvar, ref_post.logvar) < ATOL
    assert max_diff(post.std, ref_post.std) < ATOL
    assert torch.equal(post.mode(), post.mean)


@torch.no_grad()
def test_sample_matches_diffusers_with_same_seed(models, images):
    ours, ref = models
    z = ours.encode(images).sample(torch.Generator().manual_seed(42))
    ref_z = ref.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(42))
    assert max_diff(z, ref_z) < ATOL
    # A different seed must give a different latent (the noise is really used).
    assert max_diff(z, ours.encode(images).sample(torch.Generator().manual_seed(43))) > 1e-3


@torch.no_grad()
def test_decode_matches_diffusers(models):
    ours, ref = models
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x = ours.decode(z)
    assert x.shape == (2, 3, 32, 32)
    assert max_diff(x, ref.decode(z).sample) < ATOL


@torch.no_grad()
def test_non_square_roundtrip_shapes(models):
    ours, _ = models
    x = torch.zeros(1, 3, 16, 40)
    z = ours.encode(x).mode()
    assert z.shape == (1, 4, 16 // TINY.downsample_factor, 40 // TINY.downsample_factor)
    assert ours.decode(z).shape == x.shape


@torch.no_grad()
def test_linear_attention_weights_load_on_meta(models, images):
    """Files converted back from diffusers may store q/k/v/proj_out as (C, C) Linear weights."""
    ours, _ = models
    sd = dict(ours.state_dict())
    linear_keys = [k for k in sd if ".attn_1." in k and k.endswith("weight") and sd[k].ndim == 4]
    assert len(linear_keys) == 8  # q, k, v, proj_out in encoder and decoder
    for k in linear_keys:
        sd[k] = sd[k][:, :, 0, 0].clone()
    with torch.device("meta"):
        loaded = AutoencoderKL(TINY)
    loaded.load_state_dict(sd, strict=True, assign=True)
    loaded.eval()
    assert loaded.encoder.mid.attn_1.q.weight.shape == (64, 64, 1, 1)
    assert sd[linear_keys[0]].ndim == 2  # the caller's dict is left alone
    assert torch.equal(loaded.encode(images).mean, ours.encode(images).mean)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.decode(z), ours.decode(z))


@torch.no_grad()
def test_bfloat16_runs_and_keeps_dtype(models):
    ours, _ = models
    half = copy.deepcopy(ours).to(torch.bfloat16)
    x = torch.zeros(1, 3, 32, 32, dtype=torch.bfloat16)
    post = half.encode(x)
    assert post.sample(torch.Generator().manual_seed(0)).dtype == torch.bfloat16
    assert half.decode(post.mode()).dtype == torch.bfloat16


def test_logvar_is_clamped_as_in_ldm():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), 100.0), torch.full((1, 2, 2, 2), -100.0)], 1)
    post = DiagonalGaussian(moments)
    assert post.logvar[:, :2].eq(20.0).all() and post.logvar[:, 2:].eq(-30.0).all()


@pytest.mark.parametrize(
    "kwargs",
    [{"norm_groups": 24}, {"channel_mult": ()}, {"channel_mult": (1, 0)}, {"latent_channels": 0}],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        VAEConfig(**kwargs)


def real_sd_vae_keys() -> set[str]:
    """The `first_stage_model.*` keys of the released SD1/SD2/SDXL VAEs, prefix stripped."""
    resnet = ["norm1", "conv1", "norm2", "conv2"]
    attn = ["norm", "q", "k", "v", "proj_out"]
    modules = ["quant_conv", "post_quant_conv"]
    for part in ("encoder", "decoder"):
        modules += [f"{part}.conv_in", f"{part}.norm_out", f"{part}.conv_out"]
        modules += [f"{part}.mid.block_{i}.{m}" for i in (1, 2) for m in resnet]
        modules += [f"{part}.mid.attn_1.{m}" for m in attn]
    # Widths 128, 256, 512, 512: the width changes at the first block of encoder levels 1, 2
    # and of decoder levels 0, 1 (decoder level i is fed by level i + 1).
    modules += [f"encoder.down.{n}.block.{b}.{m}" for n in range(4) for b in range(2) for m in resnet]
    modules += [f"encoder.down.{n}.block.0.nin_shortcut" for n in (1, 2)]
    modules += [f"encoder.down.{n}.downsample.conv" for n in (0, 1, 2)]
    modules += [f"decoder.up.{n}.block.{b}.{m}" for n in range(4) for b in range(3) for m in resnet]
    modules += [f"decoder.up.{n}.block.0.nin_shortcut" for n in (0, 1)]
    modules += [f"decoder.up.{n}.upsample.conv" for n in (1, 2, 3)]
    return {f"{m}.{p}" for m in modules for p in ("weight", "bias")}


def test_full_size_sd_vae_on_meta_matches_real_layout_and_diffusers():
    cfg = PRESETS["sd"]
    assert cfg.downsample_factor == 8
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = diffusers.AutoencoderKL(**diffusers_config(cfg))
    sd = ours.state_dict()
    assert set(sd) == real_sd_vae_keys()
    assert len(sd) == 248
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # Every tensor lands on a diffusers tensor of the same shape, and nothing is missing.
    converted = to_diffusers(ours, cfg)
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters())
    assert round(n_params / 1e6, 2) == 83.65


def test_circular_padding_makes_the_decoder_wrap_around():
    """Tiling: with circular padding the decoder is a function on the torus, its upsampling's phase
    convolutions included: latents moved across the edges decode to the image moved f times as far.
    The CPU's banded decode pads with zeros, so `decode_latents` decodes such a VAE whole, and
    `decode_tiled` refuses it."""
    from sdlab.models.layers import circular_padding
    from sdlab.perf import decode_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=32))
    z = torch.randn(1, 4, 6, 8)
    f = vae.cfg.downsample_factor

    def moved(t: torch.Tensor, by: int) -> torch.Tensor:
        return torch.roll(t, (by, 3 * by), dims=(-2, -1))

    with torch.no_grad():
        plain = decode_latents(vae, z)
        with circular_padding(vae):
            assert vae.circular()
            image = decode_latents(vae, z)
            torch.testing.assert_close(decode_latents(vae, moved(z, 1)), moved(image, f), rtol=1e-4, atol=1e-5)
            with pytest.raises(ValueError, match="circular"):
                vae.decode_tiled(z)
        assert not vae.circular()
        torch.testing.assert_close(decode_latents(vae, z), plain, rtol=0, atol=0)
        assert (decode_latents(vae, moved(z, 1)) - moved(plain, f)).abs().max() > 1e-2


# ---- SD3's VAE: 16 latent channels, no quant_conv / post_quant_conv

TINY_SD3 = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, latent_channels=16,
                     use_quant_conv=False)


@pytest.fixture(scope="module")
def sd3_models() -> tuple[AutoencoderKL, nn.Module]:
    torch.manual_seed(0)
    ours = AutoencoderKL(TINY_SD3).eval()
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    ref = diffusers.AutoencoderKL(**diffusers_config(TINY_SD3)).eval()
    ref.load_state_dict(to_diffusers(ours, TINY_SD3), strict=True)
    return ours, ref


@torch.no_grad()
def test_sd3_vae_matches_diffusers(sd3_models, images):
    ours, ref = sd3_models
    assert not any("quant_conv" in k for k in ours.state_dict())
    post = ours.encode(images)
    ref_post = ref.encode(images).latent_dist
    assert post.mean.shape == (2, 16, 8, 8)
    assert max_diff(post.mean, ref_post.mean) < ATOL
    assert max_diff(post.logvar, ref_post.logvar) < ATOL
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    assert max_diff(ours.decode(z), ref.decode(z).sample) < ATOL


@torch.no_grad()
def test_sd3_vae_tiled_passes_match_whole(sd3_models, images):
    ours, _ = sd3_models
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    assert max_diff(ours.decode_tiled(z, tile=16), ours.decode(z)) < ATOL
    assert max_diff(ours.encode_tiled(images[:1], tile=16).mean, ours.encode(images[:1]).mean) < ATOL


@pytest.mark.parametrize("cfg", [TINY, TINY_SD3, PRESETS["sd"], PRESETS["sd3"]])
def test_config_from_state_dict(cfg):
    with torch.device("meta"):
        sd = AutoencoderKL(replace(cfg, norm_groups=32)).state_dict()
    shapes = {f"first_stage_model.{k}": tuple(v.shape) for k, v in sd.items()}
    shapes["model.diffusion_model.pos_embed"] = (1, 4, 8)  # other networks' keys are ignored
    assert config_from_state_dict(shapes, "first_stage_model.") == replace(cfg, norm_groups=32)


def test_config_from_state_dict_errors():
    with pytest.raises(SdlabError, match="no VAE"):
        config_from_state_dict({"encoder.conv_in.weight": (128, 3, 3, 3)})
    with pytest.raises(SdlabError, match="missing first_stage_model.decoder.conv_out.weight"):
        config_from_state_dict({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
                                "first_stage_model.decoder.conv_in.weight": (512, 16, 3, 3)}, "first_stage_model.")


def test_full_size_sd3_vae_on_meta_matches_diffusers():
    cfg = PRESETS["sd3"]
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = diffusers.AutoencoderKL(**diffusers_config(cfg))
    sd = ours.state_dict()
    assert set(sd) == {k for k in real_sd_vae_keys() if "quant_conv" not in k}
    assert tuple(sd["encoder.conv_out.weight"].shape) == (32, 512, 3, 3)
    assert tuple(sd["decoder.conv_in.weight"].shape) == (512, 16, 3, 3)
    converted = to_diffusers(ours, cfg)
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters())
    assert round(n_params / 1e6, 2) == 83.82
