"""T5 v1.1 encoder: equal to transformers' T5EncoderModel on the same random weights, loaded
through diffusers' own SD3 single-file converter (which proves the checkpoint key layout too);
no overflow in fp16; weights stored in fp8 computing in bf16 / fp16 / fp32."""

import pytest
import torch
import transformers

from sdlab.errors import SdlabError
from sdlab.models import storage
from sdlab.models.t5 import PRESETS, T5Config, T5Encoder, config_from_state_dict, relative_position_bucket

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_sd3_t5_checkpoint_to_diffusers  # noqa: E402

ATOL = 1e-4
PREFIX = "text_encoders.t5xxl.transformer."
# diffusers' suggested tiny T5 (d_kv 8, 4 heads, d_ff 37), 3 layers; inner width (32) differs
# from d_model (48) so q/k/v/o cannot be transposed by mistake.
TINY = T5Config(vocab_size=128, d_model=48, d_kv=8, num_heads=4, d_ff=37, num_layers=3)


def random_model(cfg: T5Config = TINY, seed: int = 0) -> T5Encoder:
    """Every tensor drawn: norm gains near 1, tables at unit scale, matrices at 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    model = T5Encoder(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            noise = torch.randn(t.shape, generator=g)
            if "layer_norm" in name:
                t.copy_(1 + 0.2 * noise)
            elif name == "shared.weight" or "relative_attention_bias" in name:
                t.copy_(noise)
            else:
                t.copy_(noise / t.shape[1] ** 0.5)
    return model


def hf_config(cfg: T5Config) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, num_heads=cfg.num_heads, d_ff=cfg.d_ff,
        num_layers=cfg.num_layers, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon)


def reference(model: T5Encoder) -> transformers.T5EncoderModel:
    single_file = {PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sd3_t5_checkpoint_to_diffusers(single_file)
    converted["encoder.embed_tokens.weight"] = converted["shared.weight"]  # tied in transformers
    ref = transformers.T5EncoderModel(hf_config(model.cfg)).eval()
    ref.load_state_dict(converted, strict=True)
    return ref


def tokens(length: int = 150) -> torch.Tensor:
    """Longer than max_distance (128), so every bucket, the clamped ones included, is used."""
    ids = torch.randint(2, TINY.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    ids[0, 20] = 1  # EOS, then padding, as SD3 feeds T5
    ids[0, 21:] = 0
    return ids


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def pair() -> tuple[T5Encoder, transformers.T5EncoderModel]:
    model = random_model()
    return model, reference(model)


@torch.no_grad()
def test_matches_transformers(pair):
    ours, ref = pair
    ids = tokens()
    out = ours(ids)
    assert out.shape == (2, 150, TINY.d_model) and out.dtype == torch.float32
    assert max_diff(out, ref(ids).last_hidden_state) < ATOL
    mask = (ids != 0) | (torch.arange(150) <= 20)  # the real tokens and the EOS
    assert max_diff(ours(ids, mask), ref(ids, attention_mask=mask.long()).last_hidden_state) < ATOL


def test_relative_position_buckets_match_transformers():
    offsets = torch.arange(-300, 301)[None]
    for buckets, distance in ((32, 128), (8, 20)):
        expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            offsets, bidirectional=True, num_buckets=buckets, max_distance=distance)
        assert torch.equal(relative_position_bucket(offsets, buckets, distance), expected)


def test_config_from_state_dict_and_either_token_table_key():
    model = random_model()
    sd = {PREFIX + k: v for k, v in model.state_dict().items()}
    assert config_from_state_dict(sd, PREFIX) == TINY
    ids = tokens(30)
    with torch.no_grad():
        expected = model(ids)
    table = sd.pop(PREFIX + "shared.weight")
    one_or_both = ({"encoder.embed_tokens.weight": table}, {"encoder.embed_tokens.weight": table, "shared.weight": table})
    for keys in one_or_both:
        state = {**{k.removeprefix(PREFIX): v for k, v in sd.items()}, **keys}
        assert config_from_state_dict(state) == TINY
        with torch.device("meta"):
            loaded = T5Encoder(TINY)
        loaded.load_state_dict(state, strict=True, assign=True)
        assert "encoder.embed_tokens.weight" in state  # the caller's dict is left alone
        with torch.no_grad():
            assert torch.equal(loaded(ids), expected)

    assert config_from_state_dict({f"x.{k}": tuple(v.shape) for k, v in model.state_dict().items()}, "x.") == TINY
    with pytest.raises(SdlabError, match="no T5 encoder"):
        config_from_state_dict({"shared.weight": (10, 4)})
    v10 = {k.replace("wi_0", "wi"): v for k, v in model.state_dict().items() if "wi_1" not in k}
    with pytest.raises(SdlabError, match="T5 v1.0"):
        config_from_state_dict(v10)


@torch.no_grad()
def test_fp16_keeps_the_residual_stream_and_wo_in_fp32():
    """With `wo` scaled up the residual stream passes fp16's 65504 (as T5-XXL's does): computing in
    fp16 still gives the fp32 result, to fp16 precision."""
    model = random_model()
    for block in model.encoder.block:
        block.layer[1].DenseReluDense.wo.weight.mul_(30000)
    stream: list[float] = []
    hooks = [b.register_forward_hook(lambda m, a, out: stream.append(out.abs().max().item()))
             for b in model.encoder.block]
    ids = tokens()
    expected = model(ids)
    for h in hooks:
        h.remove()
    assert max(stream) > 2 * torch.finfo(torch.float16).max  # the test really overflows fp16
    half = model(ids, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert max_diff(half, expected) < 0.02 * expected.abs().max()
    # Weights stored in fp16 too (`storage.set_dtypes`), computing in fp16.
    stored = storage.set_dtypes(model.requires_grad_(False), torch.float16)
    assert torch.isfinite(stored(ids)).all()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_weights(dtype):
    """Every tensor stored as float8_e4m3fn, as loaded from a t5xxl_fp8_e4m3fn file: the token and
    position tables are read row by row, each layer upcasts its weights. The reference is the
    same network with the fp8-rounded weights in fp32."""
    model = random_model()
    rounded = {k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        fp8 = T5Encoder(TINY)
    fp8.load_state_dict(rounded, assign=True)
    assert fp8.shared.weight.dtype == torch.float8_e4m3fn
    model.load_state_dict({k: v.float() for k, v in rounded.items()})
    ids = tokens()
    expected = model(ids)
    out = fp8(ids, dtype=dtype)
    assert out.dtype == dtype
    tolerance = {torch.float32: 1e-6, torch.float16: 0.01, torch.bfloat16: 0.05}[dtype]
    assert max_diff(out, expected) < tolerance * expected.abs().max()
    if dtype == torch.float32:
        assert torch.equal(fp8(ids), out)  # 8-bit weights and nothing set: fp32


@torch.no_grad()
def test_fp8_storage_through_set_dtypes():
    model = random_model().requires_grad_(False)
    ids = tokens(40)
    expected = model(ids)
    storage.set_dtypes(model, torch.bfloat16, torch.float8_e4m3fn)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn
    out = model(ids)
    assert out.dtype == torch.bfloat16
    assert max_diff(out, expected) < 0.2 * expected.abs().max()  # fp8 weights: a rough copy


@pytest.mark.slow
def test_full_size_t5_xxl_matches_transformers_key_for_key():
    cfg = PRESETS["t5-xxl"]
    with torch.device("meta"):
        ours = T5Encoder(cfg)
        ref = transformers.T5EncoderModel(hf_config(cfg))
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ref_sd) - set(sd) == {"encoder.embed_tokens.weight"} and set(sd) <= set(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    params = sum(p.numel() for p in ours.parameters())
    assert params == sum(p.numel() for p in ref.parameters())
    assert config_from_state_dict(sd) == cfg
    print(f"t5-xxl: {params / 1e6:.1f} M parameters")
