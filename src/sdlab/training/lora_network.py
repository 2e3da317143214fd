"""LoRA modules for training, attached with forward hooks, saved in kohya's format.

A LoRA adds `up(down(x)) * alpha / rank` to the output of a Linear or Conv2d layer.
The base layers are untouched (hooks, not replaced modules), so the base model's
state dict keeps its keys and weights, and removing the hooks restores it exactly.

Targets follow kohya's `networks/lora.py`: in the UNet every Linear and 1x1 conv of
the transformer blocks (diffusers' `Transformer2DModel`), plus with `conv_rank` the
ResBlocks and resamplers (LoCon / C3Lier: 3x3 convs at `conv_rank`, their Linear and
1x1 layers at `rank`); in the text encoders the attention and MLP Linears (OpenCLIP's
fused q, k, v projection as three LoRAs on its rows, as in the transformers layout). Names
are kohya's: `lora_unet_` + the diffusers module path (SDXL: the original one), `lora_te_`
(SDXL: `lora_te1_`, `lora_te2_`) + the transformers one, dots replaced by underscores.

LyCORIS (kohya's `network_module = "lycoris.kohya"`, the `lycoris-lora` package's `kohya.py` with
its default preset "full"): the same names, on the layers that preset targets (the transformer
blocks, ResBlocks and resamplers, every Linear and convolution in them, plus for SD 1.x / 2.x the
input and output convolutions and the time embedding's Linears), with `algo` = "locon" (the LoRA
module above), "loha" (`LoHaModule`: `hada_w1_a` ... `hada_w2_b`) or "lokr" (`LoKrModule`:
`lokr_w1`, `lokr_w2` or `lokr_w2_a` / `lokr_w2_b`), initialised as LyCORIS initialises them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.diffusers_keys import unet_to_diffusers
from ..errors import SdlabError
from ..lora import kohya_name
from ..models.clip import CLIPTextModel, FusedProjection, OpenCLIPAttention
from ..models.layers import autocast_dtype
from ..models.mmdit import DismantledBlock, MMDiT
from ..models.unet import UNet
from .lora_blocks import BlockRanks, block_index

UNET_PREFIX = "lora_unet"


class LoRAModule(nn.Module):
    """The low-rank update of one layer: `down` has the layer's kernel, `up` is 1x1 (kohya)."""

    def __init__(self, base: nn.Linear | FusedProjection | nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0,
                 rows: tuple[int, int] | None = None, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 lycoris: bool = False):
        """`rows`: update only these output rows of `base` (q, k or v of a fused projection).
        While training, as kohya's `networks/lora.py`: `dropout` drops single rank activations,
        `rank_dropout` whole ranks of a sample (the rest scaled up as for a smaller rank), and
        `module_dropout` the whole update of a forward pass. `lycoris`: as LyCORIS's `LoConModule`
        trains instead (its default, non-bypass mode): `rank_dropout` zeroes whole output rows of
        the update, unscaled, and plain `dropout` does nothing (the caller passes 0)."""
        super().__init__()
        self.rows = rows
        self.lycoris = lycoris
        if isinstance(base, (nn.Linear, FusedProjection)):
            out_features = base.out_features if rows is None else rows[1] - rows[0]
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, out_features, bias=False)
        else:
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        # kohya's init: down ~ Kaiming uniform, up = 0, so training starts from the base model.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.multiplier = 1.0

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(alpha)
        self.scale = alpha / self.rank

    def delta(self, x: Tensor) -> Tensor:
        return self._up(self._down(x), self.scale * self.multiplier)

    def _down(self, x: Tensor) -> Tensor:
        # Under autocast the product casts x to the autocast dtype anyway: an fp32 copy first would
        # only be cast back, and that second copy kept for backward (SD 1.5 LoRA at 512 px, bf16 base
        # under bf16 autocast: 0.23 GiB more peak memory, the same numbers).
        if autocast_dtype(x.device.type) is None:
            x = x.to(self.lora_down.weight.dtype)
        return self.dropout(self.lora_down(x))

    def _up(self, h: Tensor, scale: float) -> Tensor:
        return self.lora_up(h) * scale

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        # The random draws in kohya's order: module dropout, dropout, rank dropout.
        if self.training and self.module_dropout and torch.rand(1) < self.module_dropout:
            return output
        h = self._down(inputs[0])
        scale = self.scale * self.multiplier
        kept_rows = None
        if self.training and self.rank_dropout and self.lycoris:
            # LyCORIS's draw (`LoConModule.make_weight`): one per output row of the weight update
            kept_rows = (torch.rand(self.lora_up.weight.shape[0], device=h.device) > self.rank_dropout).to(h.dtype)
            kept_rows = kept_rows[:, None, None] if h.ndim == 4 else kept_rows
        elif self.training and self.rank_dropout:
            keep = torch.rand((h.shape[0], self.rank), device=h.device) > self.rank_dropout
            keep = keep.unsqueeze(1) if h.ndim == 3 else keep[..., None, None] if h.ndim == 4 else keep
            h = h * keep
            scale = scale / (1.0 - self.rank_dropout)
        if self.rows is not None or kept_rows is not None:  # small or rare: the plain sum will do
            delta = self._up(h, scale)
            delta = delta if kept_rows is None else delta * kept_rows
            if self.rows is not None:  # a text encoder's q, k or v
                lo, hi = self.rows
                delta = F.pad(delta, (lo, output.shape[-1] - hi))
            return output + delta.to(output.dtype)
        if isinstance(self.lora_up, nn.Linear) and h.dtype == output.dtype and output.is_contiguous():
            return _AddLowRank.apply(output, h, self.lora_up.weight, scale)
        return output + self._up(h, scale).to(output.dtype)

    @torch.no_grad()
    def merged_weight_delta(self) -> Tensor:
        """The change of the base layer's weight this LoRA amounts to (for merging)."""
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        if down.ndim == 2:
            return up @ down * self.scale
        if down.shape[2:] == (1, 1):
            return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1) * self.scale
        # 3x3 down, 1x1 up: the product is a 3x3 kernel (kohya's merge)
        return torch.einsum("or,rikl->oikl", up.flatten(1), down) * self.scale


class _AddLowRank(torch.autograd.Function):
    """`out + (h @ up.T) * scale`, accumulated into `out` in place (a Linear LoRA's update).

    Out of place, the update makes three full-size temporaries per layer (up's output, the scaled
    copy, the sum); on the CPU the heap grows around such freed blocks while a training forward
    keeps its activations (SD 1.5 LoRA at 512 px: 0.5 GiB less peak memory without them). In
    place is safe: `out` is the base layer's fresh output, and a Linear keeps nothing of its
    output for backward. A Function rather than `addmm_` on a reshaped view, which autograd
    would follow with full-size gradient copies; this backward keeps to views and two matmuls.
    """

    @staticmethod
    def forward(ctx, out: Tensor, h: Tensor, up: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(h, up)
        ctx.scale = scale
        flat_out, flat_h, up_t = out.view(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), up.t().to(out.dtype)
        if out._is_view():  # a Linear with a bias returns a view of its matmul: in place there costs a copy
            return torch.addmm(flat_out, flat_h, up_t, alpha=scale).view(out.shape)
        ctx.mark_dirty(out)
        flat_out.addmm_(flat_h, up_t, alpha=scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, up = ctx.saved_tensors
        flat_grad, flat_h = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
        grad_h = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_h = (flat_grad @ up.to(grad.dtype)).mul_(ctx.scale).view(h.shape)
        if ctx.needs_input_grad[2]:
            grad_up = (flat_grad.t() @ flat_h).mul_(ctx.scale).to(up.dtype)
        return grad, grad_h, grad_up, None


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a LoKr dimension into (m, n), m <= n, m * n = dimension: m = `factor`
    when it divides, else the divisor pair closest to a square with m not above `factor`
    (`lycoris.functional.general.factorization`)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class _WeightDeltaModule(nn.Module):
    """A LyCORIS module whose update is a full weight delta built from its factors (LoHa, LoKr):
    the hooked layer's output gets `op(x, dW * alpha / rank * multiplier)`, `op` being the layer's
    own linear map or convolution, as LyCORIS's modules compute it. In training, as theirs:
    `module_dropout` skips the whole update, `rank_dropout` zeroes output rows of dW. (They have
    no plain dropout.)"""

    def __init__(self, base: nn.Linear | FusedProjection | nn.Conv2d, rank: int, alpha: float,
                 rows: tuple[int, int] | None = None, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.rows = rows
        if isinstance(base, nn.Conv2d):
            self.shape = (base.out_channels, base.in_channels // base.groups, *base.kernel_size)
            self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        else:
            out = base.out_features if rows is None else rows[1] - rows[0]
            self.shape, self.conv = (out, base.in_features), None
        alpha = float(alpha) or float(rank)  # LyCORIS: alpha 0 or None means alpha = rank (scale 1)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.rank, self.scale, self.multiplier = rank, alpha / rank, 1.0
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(alpha)
        self.scale = alpha / self.rank

    def weight(self) -> Tensor:
        """dW without its scale, in the layer's weight shape."""
        raise NotImplementedError

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if self.training and self.module_dropout and torch.rand(1) < self.module_dropout:
            return output
        w = self.weight() * (self.scale * self.multiplier)
        if self.training and self.rank_dropout:
            drop = (torch.rand(w.size(0)) > self.rank_dropout).to(w)
            w = w * drop.view(-1, *[1] * (w.ndim - 1))
        x = inputs[0]
        if autocast_dtype(x.device.type) is None:
            x = x.to(w.dtype)
        delta = F.linear(x, w) if self.conv is None else F.conv2d(x, w, None, **self.conv)
        if self.rows is not None:
            lo, hi = self.rows
            delta = F.pad(delta, (lo, output.shape[-1] - hi))
        return output + delta.to(output.dtype)

    @torch.no_grad()
    def merged_weight_delta(self) -> Tensor:
        return self.weight().float() * self.scale


class LoHaModule(_WeightDeltaModule):
    """LyCORIS's LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise, the `_b` factors over the
    layer's flattened input (in x kh x kw). Initialised as LyCORIS's `LohaModule`: w1_b ~ N(0, 1),
    w1_a ~ N(0, 0.1), w2_b ~ N(0, 1) and w2_a = 0, in that order (dW starts at 0)."""

    def __init__(self, base, rank: int, alpha: float, **kw):
        super().__init__(base, rank, alpha, **kw)
        out, flat_in = self.shape[0], math.prod(self.shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(out, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, flat_in))
        self.hada_w2_a = nn.Parameter(torch.empty(out, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, flat_in))
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        nn.init.constant_(self.hada_w2_a, 0)

    def weight(self) -> Tensor:
        return ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)).reshape(self.shape)

    def factors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


class LoKrModule(_WeightDeltaModule):
    """LyCORIS's LoKr: dW = kron(w1, w2). out = a * b and in = c * d are split by `factorization`
    (`factor`); w1 is (a, c), whole; w2 is (b, d [x kh x kw]), whole when the rank is at least half
    its larger side (then alpha is ignored: scale 1, as LyCORIS does), else w2_a @ w2_b of that rank
    (a convolution's kernel in w2_b's columns). Initialised as LyCORIS's `LokrModule`: w2_a (or w2)
    Kaiming-uniform, then w2_b = 0 (or w2 = 0), then w1 Kaiming-uniform."""

    def __init__(self, base, rank: int, alpha: float, factor: int = -1, **kw):
        super().__init__(base, rank, alpha, **kw)
        out, inp, *kernel = self.shape
        (a, b), (c, d) = factorization(out, factor), factorization(inp, factor)
        self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        self.full_w2 = rank >= max(b, d) / 2
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel))
            self.set_alpha(float(rank))  # LyCORIS: both factors whole, so scale 1
            nn.init.constant_(self.lokr_w2, 0)
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, d * math.prod(kernel)))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            nn.init.constant_(self.lokr_w2_b, 0)
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))

    def weight(self) -> Tensor:
        w2 = self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b
        if w2.ndim == 2:
            return torch.kron(self.lokr_w1, w2).reshape(self.shape)
        return torch.kron(self.lokr_w1[:, :, None, None], w2)

    def factors(self) -> dict[str, Tensor]:
        names = ("lokr_w1", "lokr_w2") if self.full_w2 else ("lokr_w1", "lokr_w2_a", "lokr_w2_b")
        return {k: getattr(self, k) for k in names}


ALGOS = ("lora", "locon", "loha", "lokr")


def _unet_targets(unet: UNet, conv: bool, extra: Sequence[str] = ()) -> Iterator[tuple[str, nn.Module, bool]]:
    """(native module path, layer, is_3x3_conv) of the UNet layers kohya puts LoRA on; `extra`:
    paths of single layers targeted too (LyCORIS's input / output convolutions, time embedding)."""
    from ..models.unet import Downsample, ResBlock, SpatialTransformer, Upsample

    for path in extra:
        layer = unet.get_submodule(path)
        yield path, layer, isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
    kinds = (SpatialTransformer, ResBlock, Downsample, Upsample) if conv else (SpatialTransformer,)
    for parent_name, parent in unet.named_modules():
        if not isinstance(parent, kinds):
            continue
        for child_name, child in parent.named_modules():
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)):
                yield f"{parent_name}.{child_name}", child, False
            elif conv and isinstance(child, nn.Conv2d):
                yield f"{parent_name}.{child_name}", child, True


def unet_kohya_names(unet: UNet, native_paths: list[str], spelling: str = "diffusers") -> dict[str, str]:
    """native module path -> kohya name: `lora_unet_` + the diffusers path with `_` (kohya's SD 1.x /
    2.x scripts), or with `spelling="original"` + the native path itself (its SDXL scripts:
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`)."""
    if spelling == "original":
        return {p: kohya_name(p, "unet") for p in native_paths}
    renamed = unet_to_diffusers({p + ".weight": torch.empty(0) for p in native_paths}, unet.cfg)
    out = {}
    for native, diffusers_key in zip(native_paths, renamed):
        out[native] = UNET_PREFIX + "_" + diffusers_key.removesuffix(".weight").replace(".", "_")
    return out


def _mmdit_targets(net: MMDiT) -> Iterator[tuple[str, nn.Linear]]:
    """(native module path, layer) of the MMDiT layers kohya's `networks/lora_sd3.py` puts LoRA on by
    default: every Linear of each joint block's two streams (its `SingleDiTBlock`s): `attn.qkv` (q, k
    and v fused, as the checkpoint stores them), `attn.proj`, `mlp.fc1`, `mlp.fc2`,
    `adaLN_modulation.1`, and MMDiT-X's `attn2.qkv` / `attn2.proj`. The pre-only last context block
    has `attn.qkv` and its modulation only."""
    for parent_name, parent in net.named_modules():
        if isinstance(parent, DismantledBlock):
            for child_name, child in parent.named_modules():
                if isinstance(child, nn.Linear):
                    yield f"{parent_name}.{child_name}", child


def mmdit_kohya_name(native_path: str) -> str:
    """kohya's SD3 name of an MMDiT module: `lora_unet_` + its path with `_`
    (`lora_unet_joint_blocks_0_x_block_attn_qkv`), the prefix ComfyUI reads."""
    return f"{UNET_PREFIX}_{native_path.replace('.', '_')}"


_TE_LAYER = re.compile(r"^(?:text_model\.encoder\.layers|transformer\.resblocks)\.(\d+)\.")
_TE_TARGET = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")


def _te_targets(te: CLIPTextModel, layers: int) -> Iterator[tuple[str, nn.Module, Tensor, tuple[int, int] | None]]:
    """(module path, layer to hook, its weight, rows) of the attention and MLP Linears kohya puts
    LoRA on, in the first `layers` layers. OpenCLIP's q, k and v are rows of one fused projection,
    named as the transformers layout's `q_proj`, `k_proj`, `v_proj` (`lora.kohya_name`)."""
    for name, mod in te.named_modules():
        layer = _TE_LAYER.match(name)
        if layer is None or int(layer.group(1)) >= layers:
            continue
        if isinstance(mod, nn.Linear) and _TE_TARGET.search(name):
            yield name, mod, mod.weight, None
        elif isinstance(mod, OpenCLIPAttention):
            width = mod.out_proj.in_features
            for i, x in enumerate("qkv"):
                yield f"{name}.{x}_proj", mod.in_proj, mod.in_proj_weight, (i * width, (i + 1) * width)


class LoRANetwork(nn.Module):
    """All LoRA modules of one model, by kohya name. `apply()` attaches them, `remove()` detaches."""

    def __init__(self, unet: UNet | MMDiT | None, text_encoders: Sequence[CLIPTextModel] | None, rank: int, alpha: float,
                 conv_rank: int = 0, conv_alpha: float = 1.0, dropout: float = 0.0, only: str | None = None,
                 unet_names: str = "diffusers", text_layers: Sequence[int] | None = None,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, blocks: BlockRanks | None = None,
                 algo: str = "lora", factor: int = -1, lycoris: bool = False):
        """`text_encoders`: the model's text encoders to train too (named `lora_te_`, or SDXL's two
        `lora_te1_` and `lora_te2_`), none, or None. `text_layers`: for each, how many of its first
        layers get LoRA (the layers after the one the UNet reads change nothing; SD 2.x's diffusers
        folders and kohya's do not even have its last one); None: all.
        `only`: a regex; when given, just the layers whose kohya name it matches (`re.search`),
        e.g. `r"attn[12]_to_(q|k|v|out_0)$"` for the attention projections as diffusers' scripts.
        `unet_names`: "diffusers" or "original", how the UNet's modules are spelled (`unet_kohya_names`).
        `dropout`, `rank_dropout`, `module_dropout`: kohya's, see `LoRAModule`.
        `blocks`: kohya's block-wise ranks and learning rates for the UNet (`lora_blocks`); they
        replace `rank` / `conv_rank` there, and a block of rank 0 gets no LoRA.
        `lycoris`: the layers of LyCORIS's kohya network (preset "full"; see the module's doc), with
        `algo` "lora" / "locon" (LoRA modules), "loha" or "lokr" (`factor`: LoKr's split)."""
        super().__init__()
        if algo not in ALGOS:
            raise SdlabError(f"LyCORIS algo {algo!r} is not one sdlab trains; use one of {', '.join(ALGOS)}")
        self.algo, self.factor, self.lycoris = algo, factor, lycoris
        self._only = re.compile(only) if only else None
        self.rank, self.alpha, self.conv_rank, self.conv_alpha = rank, alpha, conv_rank, conv_alpha
        self._dropouts = dict(dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
        self.loras = nn.ModuleDict()
        self.blocks = blocks
        self._block_of: dict[str, int | None] = {}  # UNet LoRA name -> kohya block number
        self._targets: dict[str, nn.Module] = {}
        self._weights: dict[str, tuple[Tensor, tuple[int, int] | None]] = {}
        self._handles: list = []
        if isinstance(unet, MMDiT):  # SD3 / SD3.5 (kohya's networks.lora_sd3): no convolutions, no blocks
            for path, layer in _mmdit_targets(unet):
                self._add(mmdit_kohya_name(path), layer, rank, alpha)
        elif unet is not None:
            conv = conv_rank > 0 if blocks is None else blocks.conv_dims is not None
            # LyCORIS's names "conv_in", "conv_out", "time_embedding.linear_1/2" exist only in the
            # diffusers spelling (kohya's SD 1.x / 2.x UNet), not in its SDXL one.
            extra = ("input_blocks.0.0", "time_embed.0", "time_embed.2", "out.2") if (
                lycoris and unet_names == "diffusers") else ()
            targets = list(_unet_targets(unet, conv, extra))
            names = unet_kohya_names(unet, [p for p, _, _ in targets], unet_names)
            for path, layer, is_conv3 in targets:
                if blocks is not None:
                    r, a = blocks.rank(path, is_conv3)
                    if r == 0:
                        continue
                    self._block_of[names[path]] = block_index(path, blocks.sdxl)
                else:
                    r, a = (conv_rank, conv_alpha) if is_conv3 else (rank, alpha)
                self._add(names[path], layer, r, a)
        text_encoders = list(text_encoders or [])
        parts = ["te"] if len(text_encoders) == 1 else [f"te{i + 1}" for i in range(len(text_encoders))]
        for i, (te, part) in enumerate(zip(text_encoders, parts)):
            layers = te.cfg.layers if text_layers is None else text_layers[i]
            for path, layer, weight, rows in _te_targets(te, layers):
                self._add(kohya_name(path, part), layer, rank, alpha, weight, rows)
        if not self.loras:
            raise SdlabError("LoRA: the model has no layers to attach LoRA to (no transformer blocks?)")

    def _add(self, name: str, layer: nn.Module, rank: int, alpha: float,
             weight: Tensor | None = None, rows: tuple[int, int] | None = None) -> None:
        """`weight`: the one `layer` computes with (default `layer.weight`); `rows`: the part of it
        this LoRA changes (q, k or v of a fused projection)."""
        if self._only is not None and not self._only.search(name):
            return
        weight = layer.weight if weight is None else weight
        # LyCORIS's modules (LoCon too, outside its bypass mode) have no plain dropout in training.
        drops = {k: v for k, v in self._dropouts.items()
                 if k != "dropout" or not (self.lycoris or self.algo in ("loha", "lokr"))}
        if self.algo in ("loha", "lokr"):
            module = (LoHaModule(layer, rank, alpha, rows=rows, **drops) if self.algo == "loha"
                      else LoKrModule(layer, rank, alpha, self.factor, rows=rows, **drops))
        else:
            module = LoRAModule(layer, rank, alpha, rows=rows, lycoris=self.lycoris, **drops)
        self.loras[name] = module.to(device=weight.device, dtype=torch.float32)
        self._targets[name] = layer
        self._weights[name] = (weight, rows)

    def optimizer_groups(self, unet_lr: float, te_lr: float, unet_up_ratio: float | None = None,
                         te_up_ratio: float | None = None) -> list[dict]:
        """Parameter groups as kohya's `prepare_optimizer_params` makes them: the text encoders'
        LoRAs at `te_lr`; the UNet's at `unet_lr`, per block times its learning-rate weight when
        block weights are set (a block at 0 gets no group); with a LoRA+ ratio, each part's
        `lora_up` weights in a group of their own at lr x ratio."""
        parts: dict[tuple[str, float], list[tuple[str, nn.Parameter]]] = {}
        weights = self.blocks.lr_weights if self.blocks is not None else None
        for name, m in self.loras.items():
            if name.startswith(UNET_PREFIX):
                block = self._block_of.get(name)
                lr = unet_lr * (weights[block] if weights is not None and block is not None else 1.0)
                key = ("unet", lr)
            else:
                key = ("te", te_lr)
            parts.setdefault(key, []).extend(m.named_parameters())
        groups = []
        for (part, lr), params in parts.items():
            ratio = unet_up_ratio if part == "unet" else te_up_ratio
            up = [p for n, p in params if ratio is not None and n.startswith("lora_up.")]
            rest = [p for n, p in params if not (ratio is not None and n.startswith("lora_up."))]
            groups += [{"params": rest, "lr": lr}] + ([{"params": up, "lr": lr * ratio}] if up else [])
        return [g for g in groups if g["params"] and g["lr"] != 0]

    def apply(self) -> None:
        self.remove()
        self._handles = [self._targets[n].register_forward_hook(m.hook) for n, m in self.loras.items()]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        sd = {}
        for name, m in self.loras.items():
            if not isinstance(m, LoRAModule):  # LoHa / LoKr: LyCORIS's factor names
                for k, w in m.factors().items():
                    sd[f"{name}.{k}"] = w.detach().to(dtype) if dtype is not None else w.detach()
                sd[f"{name}.alpha"] = m.alpha.detach().to(dtype or torch.float32)
                continue
            for part in ("lora_down", "lora_up"):
                w = getattr(m, part).weight.detach()
                sd[f"{name}.{part}.weight"] = w.to(dtype) if dtype is not None else w
            sd[f"{name}.alpha"] = m.alpha.detach().to(dtype or torch.float32)
        return sd

    @torch.no_grad()
    def load_kohya_weights(self, tensors: Mapping[str, Tensor]) -> tuple[list[str], list[str]]:
        """Start from a kohya LoRA's weights (kohya's --network_weights): each module here that the
        file names takes its down, up and alpha. Returns the file's modules that name none here and
        the modules here that the file lacks (they keep their fresh start).

        Raises:
            SdlabError: a module of another rank, or of another shape (a LoRA for another model).
        """
        in_file = {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")}
        for name in sorted(set(self.loras) - in_file):
            m = self.loras[name]
            if isinstance(m, LoRAModule) or not all(f"{name}.{k}" in tensors for k in m.factors()):
                continue
            in_file.add(name)  # LoHa / LoKr: the same factors, shape for shape
            for k, w in m.factors().items():
                if tensors[f"{name}.{k}"].shape != w.shape:
                    raise SdlabError(f"{name}.{k}: the file's is {tuple(tensors[f'{name}.{k}'].shape)}, this run's "
                                     f"{tuple(w.shape)}: another rank, factor or model")
                w.copy_(tensors[f"{name}.{k}"])
            if f"{name}.alpha" in tensors:
                m.set_alpha(float(tensors[f"{name}.alpha"]))
        for name in sorted(in_file & set(self.loras)):
            m = self.loras[name]
            if not isinstance(m, LoRAModule):
                continue
            down, up = tensors[f"{name}.lora_down.weight"], tensors.get(f"{name}.lora_up.weight")
            if down.shape[0] != m.rank:
                raise SdlabError(f"{name}: the file's LoRA has rank {down.shape[0]}, this run's {m.rank}; set "
                                 f"lora.{'conv_rank' if down.ndim == 4 and down.shape[-1] > 1 else 'rank'} = "
                                 f"{down.shape[0]}")
            if up is None or down.shape != m.lora_down.weight.shape or up.shape != m.lora_up.weight.shape:
                raise SdlabError(f"{name}: the file's LoRA is {tuple(down.shape)} x "
                                 f"{tuple(up.shape) if up is not None else 'nothing'}, this model's layer needs "
                                 f"{tuple(m.lora_down.weight.shape)} x {tuple(m.lora_up.weight.shape)}: "
                                 f"a LoRA for another model")
            m.lora_down.weight.copy_(down)
            m.lora_up.weight.copy_(up)
            if f"{name}.alpha" in tensors:
                m.set_alpha(float(tensors[f"{name}.alpha"]))
        return sorted(in_file - set(self.loras)), sorted(set(self.loras) - in_file)

    @torch.no_grad()
    def merge(self) -> None:
        """Add every LoRA into its base weight (for tests and exports); detach the hooks first."""
        self.remove()
        for name, m in self.loras.items():
            weight, rows = self._weights[name]
            w = weight if rows is None else weight[rows[0]:rows[1]]
            w += m.merged_weight_delta().reshape(w.shape).to(w.dtype)
