"""MMDiT, the denoiser of Stable Diffusion 3 and 3.5, with SD3.5-medium's MMDiT-X variant.

Mirrors `MMDiTX` of Stability-AI/sd3.5
(https://github.com/Stability-AI/sd3.5/blob/fbf8f48/mmditx.py), without the options that no
released checkpoint uses (registers, RMSNorm blocks, scale-only modulation, SwiGLU, learned
sigma). Attribute names equal the single-file checkpoint keys after `model.diffusion_model.`,
so loading is a prefix strip.

Each layer has two streams, `joint_blocks.N.context_block` (text tokens) and
`joint_blocks.N.x_block` (image patches). They compute q, k and v separately, attend jointly over
the text tokens followed by the image tokens, and split the result back. The last layer's context
block is "pre-only": it only contributes keys and values, and its output is discarded. MMDiT-X
layers (`x_block_self_attn_layers`) add a second, image-only attention (`x_block.attn2`).

The original splits the final layer's modulation (and that of the last context block) as
(shift, scale); diffusers' AdaLayerNormContinuous uses (scale, shift), and its converter swaps
the halves. Here the weights keep the original order.
"""

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdlab.errors import SdlabError
from sdlab.models.layers import Linear, timestep_embedding
from sdlab.models.storage import compute_dtype


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int = 24  # number of joint blocks
    hidden_size: int = 1536  # 64 * depth in every released model; not assumed here
    heads: int = 24  # depth in every released model (64 channels per head)
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    # Side of the square grid of learned positions, in patches (`pos_embed` holds its square).
    # An image of h x w patches takes the centred h x w window of it.
    pos_embed_max_size: int = 192
    # Width of the pooled text vector y (CLIP-L 768 + CLIP-G 1280); None: no y_embedder.
    adm_in_channels: int | None = 2048
    context_dim: int = 4096  # width of the text tokens (T5-XXL's; CLIP features are zero-padded to it)
    mlp_ratio: float = 4.0  # MLP hidden width / hidden_size
    qk_norm: bool = False  # RMSNorm on each head's q and k (SD3.5)
    # MMDiT-X (SD3.5-medium): layers whose x_block has a second, image-only attention `attn2`.
    x_block_self_attn_layers: tuple[int, ...] = ()
    timestep_embed_dim: int = 256  # width of the sinusoidal embedding of t

    def __post_init__(self) -> None:
        # Configs read back from JSON (checkpoint metadata) carry lists; keep the dataclass hashable.
        object.__setattr__(self, "x_block_self_attn_layers", tuple(sorted(set(self.x_block_self_attn_layers))))
        for name in ("depth", "hidden_size", "heads", "patch_size", "in_channels", "out_channels",
                     "pos_embed_max_size", "context_dim", "timestep_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MMDiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.adm_in_channels is not None and self.adm_in_channels < 1:
            raise ValueError(f"MMDiTConfig.adm_in_channels must be >= 1 or None, got {self.adm_in_channels}")
        if self.hidden_size % self.heads:
            raise ValueError(f"MMDiTConfig.heads ({self.heads}) must divide hidden_size ({self.hidden_size})")
        if self.mlp_hidden_size < 1:
            raise ValueError(f"MMDiTConfig.mlp_ratio ({self.mlp_ratio}) gives no MLP width")
        if any(not 0 <= i < self.depth for i in self.x_block_self_attn_layers):
            raise ValueError(f"MMDiTConfig.x_block_self_attn_layers {self.x_block_self_attn_layers} must be layers "
                             f"0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# The released models (reference `sd3_impls.py` BaseModel reads these off the keys; checked
# against diffusers' `scripts/convert_sd3_to_diffusers.py`). SD3.5-large-turbo is SD3.5-large.
PRESETS: dict[str, MMDiTConfig] = {
    "sd3-medium": MMDiTConfig(),
    "sd3.5-large": MMDiTConfig(depth=38, hidden_size=2432, heads=38, qk_norm=True),
    "sd3.5-medium": MMDiTConfig(pos_embed_max_size=384, qk_norm=True, x_block_self_attn_layers=tuple(range(13))),
}


# ---------------------------------------------------------------------------------------------
# Helpers


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape if isinstance(v, Tensor) else v)


def config_from_state_dict(shapes: Mapping[str, Any], prefix: str = "", *, heads: int | None = None) -> MMDiTConfig:
    """Read the MMDiT config off a state dict's tensor shapes (the reference's `BaseModel` rules,
    without its assumption that hidden_size is 64 * depth).

    Args:
        shapes: key -> tensor or shape, of the whole file or of the MMDiT alone.
        prefix: the MMDiT's key prefix in `shapes`, e.g. "model.diffusion_model.".
        heads: the head count. Default: from the qk-norm weights (one head's width) where the
            model has them, else 64 channels per head as in every released model, else one head
            per layer (the reference's rule).

    Raises:
        SdlabError: no MMDiT under the prefix, or one whose layout this MMDiT cannot express.
    """
    s = {k[len(prefix):]: _shape(v) for k, v in shapes.items() if k.startswith(prefix)}
    if "x_embedder.proj.weight" not in s or "final_layer.linear.weight" not in s:
        raise SdlabError(f"no SD3 MMDiT under the prefix {prefix!r}: 'x_embedder.proj.weight' or "
                         "'final_layer.linear.weight' is missing; check that the file is an SD3 / SD3.5 checkpoint")
    try:
        hidden, in_channels, patch, _ = s["x_embedder.proj.weight"]
        layers = {int(m.group(1)) for k in s if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
        depth = len(layers)
        if not layers or layers != set(range(depth)):
            raise SdlabError(f"the MMDiT's joint_blocks are missing or not numbered 0..{depth - 1} (a damaged file?)")
        num_patches = s["pos_embed"][-2]
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise SdlabError(f"the MMDiT's pos_embed has {num_patches} positions, not a square grid")
        qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in s
        if heads is None and qk_norm:
            heads = hidden // s["joint_blocks.0.x_block.attn.ln_q.weight"][0]
        elif heads is None:
            if hidden % 64 and hidden % depth:
                raise SdlabError(f"the MMDiT's head count cannot be read off its shapes (hidden size {hidden}, "
                                 f"{depth} layers, no qk-norm); give it explicitly")
            heads = hidden // 64 if hidden % 64 == 0 else depth
        attn2 = sorted({int(m.group(1)) for k in s if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))})
        adm = s["y_embedder.mlp.0.weight"][1] if "y_embedder.mlp.0.weight" in s else None
        return MMDiTConfig(
            depth=depth, hidden_size=hidden, heads=heads, patch_size=patch, in_channels=in_channels,
            out_channels=s["final_layer.linear.weight"][0] // (patch * patch), pos_embed_max_size=side,
            adm_in_channels=adm, context_dim=s["context_embedder.weight"][1],
            mlp_ratio=s["joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden, qk_norm=qk_norm,
            x_block_self_attn_layers=tuple(attn2), timestep_embed_dim=s["t_embedder.mlp.0.weight"][1])
    except KeyError as e:
        raise SdlabError(f"the MMDiT weights are incomplete (missing {prefix}{e.args[0]})") from None
    except ValueError as e:
        raise SdlabError(f"the MMDiT shapes give an invalid config: {e}") from e


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: `x * (1 + scale) + shift`, per sample. x (B, T, D); shift, scale (B, D)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned gain (the qk-norm of SD3.5), accumulated
    in fp32 whatever the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Blocks


class SelfAttention(nn.Module):
    """The projections of one stream's attention; the attention itself runs in `JointBlock`,
    over both streams at once."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False):
        super().__init__()
        dim = cfg.hidden_size
        self.heads = cfg.heads
        self.qkv = Linear(dim, 3 * dim)
        self.proj = None if pre_only else Linear(dim, dim)
        self.ln_q = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.ln_k = RMSNorm(cfg.head_dim) if cfg.qk_norm else None

    def pre_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        # Rows of qkv are [q | k | v], each heads x head_dim (the reference's `split_qkv`).
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, d)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def post_attention(self, out: Tensor) -> Tensor:
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, heads, T, d) -> (B, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1.gelu_tanh(x))


class DismantledBlock(nn.Module):
    """One stream of a joint layer: adaLN-modulated attention projections and MLP.

    The modulation is split as (shift, scale, gate) for the attention and the MLP, then
    (shift, scale, gate) for `attn2` in MMDiT-X layers; a pre-only block has (shift, scale) alone.
    """

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, self_attn2: bool = False):
        super().__init__()
        dim = cfg.hidden_size
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg, pre_only=pre_only)
        self.attn2 = SelfAttention(cfg) if self_attn2 else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, cfg.mlp_hidden_size)
        self.n_mods = 2 if pre_only else 9 if self_attn2 else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, self.n_mods * dim))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None,
                                                           tuple[Tensor, ...]]:
        """(q, k, v) of the joint attention, (q, k, v) of attn2 or None, the modulation chunks."""
        mods = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)
        h = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(h, mods[0], mods[1]))
        # attn2 reads the same normalised x under its own modulation.
        qkv2 = self.attn2.pre_attention(modulate(h, mods[6], mods[7])) if self.attn2 is not None else None
        return qkv, qkv2, mods

    def post_attention(self, x: Tensor, out: Tensor, out2: Tensor | None, mods: tuple[Tensor, ...]) -> Tensor:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        # x + gate * f(...) as one addcmul: one pass over the (B, T, D) stream instead of two.
        x = torch.addcmul(x, gate_msa[:, None], self.attn.post_attention(out))
        if out2 is not None:
            x = torch.addcmul(x, mods[8][:, None], self.attn2.post_attention(out2))
        return torch.addcmul(x, gate_mlp[:, None], self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, self_attn2=index in cfg.x_block_self_attn_layers)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        """(context, x) after the layer; context is None after the pre-only last layer."""
        c_qkv, _, c_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_mods = self.x_block.pre_attention(x, c)
        n = context.shape[1]
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(c_qkv, x_qkv))  # (B, heads, T_ctx + T_x, d): text first
        out = F.scaled_dot_product_attention(q, k, v)
        out2 = F.scaled_dot_product_attention(*x_qkv2) if x_qkv2 is not None else None
        x = self.x_block.post_attention(x, out[:, :, n:], out2, x_mods)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, out[:, :, :n], None, c_mods), x


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # (B, D, h, w) -> (B, h*w, D), made contiguous: as a transposed view, every elementwise op
        # after it would keep the image stream in that layout (the residual adds, the norms), and
        # each linear layer would copy it first: 3% of a 1024 px step (measured on two blocks).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear: the reference's TimestepEmbedder (on the sinusoids) and
    VectorEmbedder (on the pooled text), both keyed `mlp.0` / `mlp.2`."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class FinalLayer(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (shift, scale): the original's order
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _pos_embed_with_batch_dim(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: GGUF files drop pos_embed's leading dimension of 1."""
    key = prefix + "pos_embed"
    if key in state_dict and state_dict[key].ndim == 2:
        state_dict[key] = state_dict[key][None]


# ---------------------------------------------------------------------------------------------
# The network


class MMDiT(nn.Module):
    """The SD3 / SD3.5 denoiser: velocity from (noisy latent, timestep, text tokens, pooled text).

    Set `gradient_checkpointing = True` to recompute each joint block's activations in the
    backward pass while training.
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        dim = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, dim, cfg.patch_size)
        self.t_embedder = MLPEmbedder(cfg.timestep_embed_dim, dim)
        self.y_embedder = MLPEmbedder(cfg.adm_in_channels, dim) if cfg.adm_in_channels is not None else None
        self.context_embedder = Linear(cfg.context_dim, dim)
        # Fixed 2-D sin-cos positions in the original's training, but stored in every checkpoint,
        # so a buffer that loading fills (zeros until then).
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, dim))
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        # The private hook API takes the module (with_module=True) on every torch >= 2.1.
        self._register_load_state_dict_pre_hook(_pos_embed_with_batch_dim, with_module=True)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centred h x w window of the position grid (h, w in patches) as (1, h*w, D)."""
        side = self.cfg.pos_embed_max_size
        top, left = (side - h) // 2, (side - w) // 2
        grid = self.pos_embed.view(1, side, side, -1)[:, top:top + h, left:left + w]  # (1, h, w, D)
        return grid.reshape(1, h * w, -1)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) latents."""
        p, c = self.cfg.patch_size, self.cfg.out_channels
        x = x.view(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                skip_layers: Collection[int] = ()) -> Tensor:
        """Predict the flow velocity (noise - x0) for a batch.

        Args:
            x: (B, in_channels, H, W) noisy latents; H and W multiples of the patch size and at
                most pos_embed_max_size patches.
            t: (B,) or scalar float timesteps, sigma * 1000.
            context: (B, T, context_dim) text tokens (CLIP-L/G zero-padded, then T5).
            y: (B, adm_in_channels) pooled text, given exactly when the config has adm_in_channels.
            skip_layers: indices of joint blocks to leave out (skip-layer guidance).

        Returns:
            (B, out_channels, H, W) in x's dtype. Inputs are cast to the dtype the network computes
            in (`storage.compute_dtype`).
        """
        cfg = self.cfg
        if (y is None) != (self.y_embedder is None):
            raise ValueError("y (the pooled text) must be given exactly when the config has adm_in_channels")
        bad = [i for i in skip_layers if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"skip_layers {bad} are not layers of this {cfg.depth}-layer MMDiT")
        b, _, height, width = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} must be a multiple of the patch size {p}")
        h, w = height // p, width // p
        if max(h, w) > cfg.pos_embed_max_size:
            raise ValueError(f"latent size {height}x{width} is larger than the position grid allows "
                             f"({cfg.pos_embed_max_size * p} per side)")
        dtype = compute_dtype(self)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        # The sinusoids are computed in fp32 (fp16 cannot resolve cos(t * f) for t near 1000).
        c = self.t_embedder(timestep_embedding(t, cfg.timestep_embed_dim).to(dtype))  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y.to(dtype))
        tokens = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h, w).to(dtype)  # (B, h*w, D)
        ctx = self.context_embedder(context.to(dtype))  # (B, T, D)

        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            if recompute:
                ctx, tokens = checkpoint(block, ctx, tokens, c, use_reentrant=False)
            else:
                ctx, tokens = block(ctx, tokens, c)
        return self.unpatchify(self.final_layer(tokens, c), h, w).to(x.dtype)

