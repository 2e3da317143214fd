"""The T5 v1.1 encoder: SD3's third text encoder (T5-XXL).

Mirrors transformers' `T5EncoderModel` for T5 v1.1 checkpoints
(https://github.com/huggingface/transformers/blob/v4.44.0/src/transformers/models/t5/modeling_t5.py):
gated-GELU feed-forward (tanh approximation), RMSNorm ("T5LayerNorm") without biases, no biases
anywhere, unscaled attention (no 1/sqrt(d)), and a relative position bias that only block 0
holds and every block adds. Attribute names equal the keys of `t5xxl_fp16.safetensors` (and of
the same weights under `text_encoders.t5xxl.transformer.` in SD3 files), so loading is a prefix
strip. Files carry the token table as `shared.weight`, `encoder.embed_tokens.weight` or both (they
are tied); a load hook keeps `shared.weight`.

Precision:
- T5's activations outgrow fp16: computing in fp16, the residual stream stays in fp32 and each
  feed-forward's output projection `wo` runs in fp32 (transformers keeps `wo` in fp32,
  `_keep_in_fp32_modules`; diffusers #8778 was black images without it).
- Weights may be stored in any float dtype (fp8 `t5xxl_fp8_e4m3fn` files as loaded, fp16, bf16):
  each layer upcasts its weights to the compute dtype for the call, and the token table is read
  row by row, only the looked-up rows being upcast (an fp8 table has no index kernel on CUDA).
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.errors import SdlabError
from sdlab.models.storage import compute_dtype

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class T5Config:
    """Field names as transformers' T5Config; the defaults are T5-XXL v1.1."""

    vocab_size: int = 32128  # rows of the token table (the tokenizer uses the first 32100)
    d_model: int = 4096
    d_kv: int = 64  # width of each head
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # not in the weights; 128 in every T5
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("T5Config.relative_attention_num_buckets must be >= 4 (two halves, exact and log buckets)")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def width(self) -> int:
        """The output width (`d_model`), under the name CLIPTextConfig gives it."""
        return self.d_model


PRESETS: dict[str, T5Config] = {
    # google/t5-v1_1-xxl, as in t5xxl_fp16.safetensors (about 4.76 B parameters).
    "t5-xxl": T5Config(),
}


# ---------------------------------------------------------------------------------------------
# Helpers


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape if isinstance(v, Tensor) else v)


def config_from_state_dict(shapes: Mapping[str, Any], prefix: str = "") -> T5Config:
    """Read the T5 encoder config off a state dict's tensor shapes.

    Args:
        shapes: key -> tensor or shape, of the whole file or of the T5 alone.
        prefix: the T5's key prefix in `shapes`, e.g. "text_encoders.t5xxl.transformer.".

    Raises:
        SdlabError: no T5 v1.1 encoder under the prefix.
    """
    s = {k[len(prefix):]: _shape(v) for k, v in shapes.items() if k.startswith(prefix)}
    table = s.get("shared.weight") or s.get("encoder.embed_tokens.weight")
    if table is None or "encoder.final_layer_norm.weight" not in s:
        raise SdlabError(f"no T5 encoder under the prefix {prefix!r}: 'shared.weight' (or "
                         "'encoder.embed_tokens.weight') or 'encoder.final_layer_norm.weight' is missing")
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in s:
        raise SdlabError("this T5 has a plain ReLU feed-forward (T5 v1.0); SD3 uses T5 v1.1 (gated GELU): "
                         "use t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors")
    layers = {int(m.group(1)) for k in s if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    try:
        buckets, heads = s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        inner = s["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        return T5Config(vocab_size=table[0], d_model=table[1], d_kv=inner // heads, num_heads=heads,
                        d_ff=s["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0], num_layers=len(layers),
                        relative_attention_num_buckets=buckets)
    except KeyError as e:
        raise SdlabError(f"the T5 weights are incomplete (missing {prefix}{e.args[0]})") from None
    except ValueError as e:
        raise SdlabError(f"the T5 shapes give an invalid config: {e}") from e


def gather_rows(table: Tensor, ids: Tensor) -> Tensor:
    """`table[ids]` in the table's dtype. 8-bit tables are gathered as bytes: CUDA has no index
    kernel for float8 ("index_select_cuda not implemented for Float8_e4m3fn", ComfyUI #3696)."""
    if table.element_size() == 1 and table.is_floating_point():
        return F.embedding(ids, table.view(torch.uint8)).view(table.dtype)
    return F.embedding(ids, table)


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bidirectional bucketing of key - query offsets: half the buckets for each sign,
    each half exact for small offsets and logarithmic up to max_distance (Mesh TensorFlow's
    `_relative_position_bucket`)."""
    half = num_buckets // 2
    buckets = (relative_position > 0).long() * half
    n = relative_position.abs()
    max_exact = half // 2
    # clamp(min=1): log(0) is only ever computed for offsets the `where` takes from `n`.
    log_ratio = torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(n < max_exact, n, large)


class UpcastLinear(nn.Linear):
    """A bias-free Linear that computes in its input's dtype, whatever dtype its weight is
    stored in (the weight is upcast for the call)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


class T5LayerNorm(nn.Module):
    """RMSNorm without a bias, accumulated in fp32; the output has the compute dtype `dtype`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(dtype) * h.to(dtype)


# ---------------------------------------------------------------------------------------------
# Blocks


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.heads = cfg.num_heads
        self.q = UpcastLinear(cfg.d_model, cfg.inner_dim)
        self.k = UpcastLinear(cfg.d_model, cfg.inner_dim)
        self.v = UpcastLinear(cfg.d_model, cfg.inner_dim)
        self.o = UpcastLinear(cfg.inner_dim, cfg.d_model)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, t, _ = x.shape
        # (B, T, heads * d) -> (B, heads, T, d)
        q, k, v = (proj(x).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # T5 folds the 1/sqrt(d) into its initialisation: no scaling at all.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x, dtype), bias).to(x.dtype)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = UpcastLinear(cfg.d_model, cfg.d_ff)
        self.wi_1 = UpcastLinear(cfg.d_model, cfg.d_ff)
        self.wo = UpcastLinear(cfg.d_ff, cfg.d_model)

    def forward(self, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(h.to(out_dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        # `wo` runs in the residual stream's dtype: fp32 under fp16, where its output overflows.
        return x + self.DenseReluDense(self.layer_norm(x, dtype), x.dtype).to(x.dtype)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)])

    def forward(self, x: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
        return self.layer[1](self.layer[0](x, bias, dtype), dtype)


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


def _one_token_table(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: take the token table from `shared.weight` or, in files without
    it, from `encoder.embed_tokens.weight` (transformers ties the two; files hold one or both)."""
    tied = state_dict.pop(prefix + "encoder.embed_tokens.weight", None)
    if tied is not None:
        state_dict.setdefault(prefix + "shared.weight", tied)


# ---------------------------------------------------------------------------------------------
# The network


class T5Encoder(nn.Module):
    """The T5 v1.1 encoder stack: token ids -> last hidden states after the final norm."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)
        # The private hook API takes the module (with_module=True) on every torch >= 2.1.
        self._register_load_state_dict_pre_hook(_one_token_table, with_module=True)

    def position_bias(self, length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(1, heads, T, T) bias added to every block's attention scores, from block 0's table."""
        cfg = self.cfg
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]  # (query, key): key - query
        buckets = relative_position_bucket(relative, cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        return gather_rows(table, buckets).to(dtype).permute(2, 0, 1)[None]  # (T, T, heads) -> (1, heads, T, T)

    def forward(self, tokens: Tensor, mask: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """Encode token ids.

        Args:
            tokens: (B, T) ids (T5 pads with 0 and ends each prompt with EOS, 1).
            mask: (B, T), true (or 1) where a token may be attended to; None attends to every
                token, padding included, as SD3 does.
            dtype: the dtype to compute in (fp32, bf16 or fp16). Default: `storage.compute_dtype`,
                or fp32 where the weights are stored in an 8-bit type and nothing else was set.

        Returns:
            (B, T, d_model) in the compute dtype.
        """
        if dtype is None:
            dtype = compute_dtype(self)
            dtype = dtype if dtype in COMPUTE_DTYPES else torch.float32
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"T5 computes in float32, bfloat16 or float16, not {dtype}")
        # fp16 cannot hold T5's residual stream (values past 65504 in T5-XXL): keep that in fp32.
        stream = torch.float32 if dtype == torch.float16 else dtype
        x = gather_rows(self.shared.weight, tokens).to(stream)  # (B, T, d_model)
        bias = self.position_bias(tokens.shape[1], dtype, tokens.device)
        if mask is not None:
            blocked = torch.zeros(mask.shape, dtype=dtype, device=tokens.device)
            blocked.masked_fill_(~mask.bool(), torch.finfo(dtype).min)
            bias = bias + blocked[:, None, None, :]  # (B, heads, T, T)
        for block in self.encoder.block:
            x = block(x, bias, dtype)
        return self.encoder.final_layer_norm(x, dtype)
