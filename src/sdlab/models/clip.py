"""The CLIP text transformer: SD 1.x's CLIP ViT-L/14 (OpenAI layout), SD 2.x's OpenCLIP ViT-H/14
and SDXL's OpenCLIP ViT-bigG/14 (OpenCLIP layout).

Both layouts are the same network (pre-LN transformer with a causal mask, final LayerNorm,
pooling at the first EOS token); they differ only in parameter names and in that OpenCLIP
fuses q, k, v into one `in_proj_weight` and adds a `text_projection` matrix. Attribute names are
the single-file checkpoint keys after the family prefix:

- "openai":   SD1 `cond_stage_model.transformer.`, SDXL `conditioner.embedders.0.transformer.`
  (the same names as transformers' CLIPTextModel; reference: openai/CLIP `model.py`).
- "openclip": SD2 `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`
  (reference: mlfoundations/open_clip `src/open_clip/transformer.py`, `TextTransformer`).
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdlab.models.layers import attention


@dataclass(frozen=True)
class CLIPTextConfig:
    layout: Literal["openai", "openclip"]  # parameter naming, see the module docstring
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    max_positions: int = 77  # the context length, BOS and EOS included
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"  # OpenAI's CLIP used x*sigmoid(1.702x)
    # Output width of the pooled projection (None: no projection). openclip: a plain
    # `text_projection` matrix; openai: a bias-free `text_projection` Linear as in transformers'
    # CLIPTextModelWithProjection (SD3's clip_l / clip_g; SD1 and SDXL files have none).
    projection_dim: int | None = None
    eos_token_id: int = 49407  # pooling reads the hidden state at the first EOS of each row

    def __post_init__(self) -> None:
        if self.layout not in ("openai", "openclip"):
            raise ValueError(f"layout must be 'openai' or 'openclip', got {self.layout!r}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"activation must be 'quick_gelu' or 'gelu', got {self.activation!r}")
        for name in ("vocab_size", "width", "layers", "heads", "mlp_width", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim must be None or positive, got {self.projection_dim}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id ({self.eos_token_id}) must be below vocab_size ({self.vocab_size})")


PRESETS: dict[str, CLIPTextConfig] = {
    # SD 1.x (and SDXL's first text encoder): OpenAI CLIP ViT-L/14.
    "clip-l": CLIPTextConfig(layout="openai"),
    # SD 2.x: OpenCLIP ViT-H/14. SD2 conditions on the penultimate layer (skip=2).
    "openclip-h": CLIPTextConfig(layout="openclip", width=1024, layers=24, heads=16, mlp_width=4096,
                                 activation="gelu", projection_dim=1024),
    # SDXL's second text encoder: OpenCLIP ViT-bigG/14; its pooled output feeds the UNet.
    "openclip-bigg": CLIPTextConfig(layout="openclip", width=1280, layers=32, heads=20, mlp_width=5120,
                                    activation="gelu", projection_dim=1280),
}


class CLIPTextOutput(NamedTuple):
    hidden: Tensor  # (B, T, width): the chosen layer's states after the final LayerNorm
    pooled: Tensor  # (B, width or projection_dim): last layer, final LayerNorm, first EOS, projection


def _activation(name: str, x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x) if name == "quick_gelu" else F.gelu(x)


# ---- OpenAI layout (names as in transformers' CLIPTextModel) ----

class OpenAIAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask))


class OpenAIMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.activation = cfg.activation
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_activation(self.activation, self.fc1(x)))


class OpenAILayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.self_attn = OpenAIAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.mlp = OpenAIMLP(cfg)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class OpenAIEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        # No `position_ids` buffer: merged checkpoints carry damaged ones; positions are an arange.
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)


class OpenAIEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(OpenAILayer(cfg) for _ in range(cfg.layers))


class OpenAITextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = OpenAIEmbeddings(cfg)
        self.encoder = OpenAIEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


# ---- OpenCLIP layout ----

class FusedProjection(nn.Module):
    """`F.linear` with weights its parent holds. A module of its own, without parameters (the
    state dict keeps nn.MultiheadAttention's keys), so that a training LoRA can hook its output
    as it hooks a Linear's (`training.lora_network`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


class OpenCLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameter layout: q, k, v fused as rows of `in_proj_weight`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.in_proj = FusedProjection(cfg.width, 3 * cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.in_proj(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, width)
        return self.out_proj(attention(q, k, v, self.heads, mask))


class OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.activation = cfg.activation
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(_activation(self.activation, self.c_fc(x)))


class OpenCLIPResBlock(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = OpenCLIPAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenCLIPResBlock(cfg) for _ in range(cfg.layers))


# ---- the model ----

class CLIPTextModel(nn.Module):
    """CLIP text encoder in either checkpoint layout (`cfg.layout`); one forward for both."""

    # Keys (after the prefix) that real checkpoints carry and we rebuild or never use; the
    # loader drops keys matching any of these (anchored, so re.match/search/fullmatch agree).
    IGNORED_KEYS: tuple[str, ...] = (
        r"^(text_model\.embeddings\.)?position_ids$",  # constant arange; damaged in some merges
        r"^logit_scale$",  # OpenCLIP's contrastive temperature, unused for conditioning
        r"^(.*\.)?attn_mask$",  # OpenCLIP's causal mask buffer; rebuilt in forward
    )

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        # Training: recompute each layer in backward instead of keeping its activations.
        self.gradient_checkpointing = False
        if cfg.layout == "openai":
            self.text_model = OpenAITextTransformer(cfg)
            if cfg.projection_dim is not None:
                self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
        else:
            self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
            self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
            self.transformer = OpenCLIPTransformer(cfg)
            self.ln_final = nn.LayerNorm(cfg.width)
            nn.init.normal_(self.positional_embedding, std=0.01)  # open_clip's init
            if cfg.projection_dim is not None:
                # A plain (width, proj) matrix used as `x @ text_projection` (transformers stores its transpose).
                self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
                nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def _parts(self) -> tuple[nn.Embedding, Tensor, nn.ModuleList, nn.LayerNorm]:
        """(token embedding, position table, blocks, final norm) under either layout's names."""
        if self.cfg.layout == "openai":
            emb, m = self.text_model.embeddings, self.text_model
            return emb.token_embedding, emb.position_embedding.weight, m.encoder.layers, m.final_layer_norm
        return self.token_embedding, self.positional_embedding, self.transformer.resblocks, self.ln_final

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token embeddings (B, T, width), without positions: textual inversion edits these."""
        return self._parts()[0](tokens)

    def forward(self, tokens: Tensor, skip: int = 1, embeddings: Tensor | None = None,
                final_norm: bool = True) -> CLIPTextOutput:
        """Encode token ids.

        Args:
            tokens: (B, T) ids, T <= max_positions; also used to find each row's first EOS.
            skip: which layer's states `hidden` holds, counted from the end: 1 is the last layer,
                2 the penultimate ("CLIP skip 2"; SD 2.x always uses 2).
            embeddings: (B, T, width) replacing the token-embedding lookup (textual inversion).
            final_norm: apply the final LayerNorm to `hidden` (the web UIs' CLIP skip does; SDXL's
                conditioner takes the penultimate layer *without* it, so pass False there).
        """
        _, positions, blocks, ln = self._parts()
        b, t = tokens.shape
        if not 1 <= skip <= len(blocks):
            raise ValueError(f"skip must be in 1..{len(blocks)}, got {skip}")
        if t > positions.shape[0]:
            raise ValueError(f"sequence of {t} tokens is longer than max_positions ({positions.shape[0]})")
        x = self.embed_tokens(tokens) if embeddings is None else embeddings
        x = x + positions[:t].to(x.dtype)  # (B, T, width); the OpenAI table may be stored narrow (models.storage)
        # Causal: each token attends to itself and the tokens before it (True = attend).
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()

        hidden = x  # replaced by the output of layer `layers - skip + 1` (1-based) below
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(blocks):
            x = checkpoint(block, x, mask, use_reentrant=False) if recompute else block(x, mask)
            if i == len(blocks) - skip:
                hidden = x
        last = ln(x)
        hidden = (last if skip == 1 else ln(hidden)) if final_norm else hidden

        # The first EOS, not argmax(tokens): SD1 pads with EOS and custom vocabularies may hold larger ids.
        eos = (tokens == self.cfg.eos_token_id).int().argmax(dim=-1)  # (B,)
        pooled = last[torch.arange(b, device=x.device), eos]  # (B, width)
        if self.cfg.projection_dim is not None:
            openai = self.cfg.layout == "openai"
            pooled = self.text_projection(pooled) if openai else pooled @ self.text_projection
        return CLIPTextOutput(hidden=hidden, pooled=pooled)
