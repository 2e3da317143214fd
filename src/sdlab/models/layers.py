"""Primitives shared by more than one network: the attention function,
sinusoidal timestep embeddings and the GroupNorm used by the LDM code."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention over (B, T, heads*d) inputs through PyTorch's SDPA.

    SDPA picks flash / memory-efficient kernels on CUDA and a fused kernel on
    the CPU, so every network gets the fastest attention without a switch.
    """
    b, tq, c = q.shape
    d = c // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, tq, c)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (fractional) timesteps, [cos | sin] as in the LDM code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when a 4-D tensor is laid out so (and not also plain contiguous), else
    contiguous_format: the layout to keep when a result should match its input's."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def native_group_norm_layout(x: Tensor) -> Tensor:
    """`x` in a dense layout `torch.native_group_norm` takes on its device (F.group_norm
    ensures this itself): the CPU kernel takes channels-last too, CUDA's the usual layout alone."""
    if x.is_contiguous() or (x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are always accumulated in float32 (the LDM code's GroupNorm32).

    LDM upcasts fp16/bf16 activations to fp32 and back around the norm. PyTorch's CPU and CUDA
    group_norm kernels already accumulate half-precision inputs in fp32 and round only the
    output, so when input and weights share a dtype the native kernel gives the same numbers
    without the two extra full-size copies (about 3x faster on a bf16 CPU path). Mixed dtypes
    (e.g. fp32 weights under autocast) still take the explicit upcast.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or self.weight.dtype == x.dtype:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Frozen-base training (LoRA): keep for backward only what backward reads.
#
# Autograd keeps what a backward formula might read, whether or not that gradient is wanted: a
# Conv2d keeps its input for the weight gradient even when the weight is frozen (a Linear does not:
# mm saves its input only when the weight needs a gradient), SiLU keeps the GroupNorm output it
# reads, GEGLU the gelu output. With a frozen base and LoRA on the attention projections that is a
# third of what an SD 1.5 UNet step keeps (1.5 GiB down to 1.0 GiB at 512 px, batch 1, fp32). The
# pieces below compute the same numbers (the same kernels, bit for bit) and keep less; without
# gradients they are the plain ops.


def _needs_input_grad_only(x: Tensor, *params: Tensor | None) -> bool:
    return torch.is_grad_enabled() and x.requires_grad and not any(p is not None and p.requires_grad for p in params)


class _FrozenConv2d(torch.autograd.Function):
    """F.conv2d whose weight and bias get no gradient: keeps the weight and the input's shape only."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.x_shape, ctx.conv = x.shape, (stride, padding, dilation, groups)
        ctx.x_format = memory_format_of(x)
        ctx.as_matmul = _conv_as_matmul_is_faster(x, weight, stride, padding, dilation, groups)
        if ctx.as_matmul:
            return _conv2d_as_matmul(x, weight, bias, stride, padding, dilation)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        if ctx.as_matmul:
            # The input gradient of a convolution is the weight's transpose times the output
            # gradient, summed back over the kernel windows (col2im, F.fold).
            cols = _batched_matmul(weight.flatten(1).t(), grad.flatten(2))
            dx = F.fold(cols, ctx.x_shape[2:], weight.shape[2:], dilation, padding, stride)
            return dx.contiguous(memory_format=ctx.x_format), None, None, None, None, None, None
        # The input gradient reads only the input's shape and layout, so an uninitialised stand-in
        # will do (never touched, so it costs no memory traffic). Not torch.nn.grad.conv2d_input's
        # expanded one-element tensor: convolution_backward would first copy that to full size.
        shape_only = torch.empty(ctx.x_shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.x_format)
        # Under autocast the forward ran in grad's dtype: recast the weight rather than keep a copy.
        dx = torch.ops.aten.convolution_backward(grad, shape_only, weight.to(grad.dtype), None, stride, padding,
                                                 dilation, False, [0], groups, (True, False, False))[0]
        return dx, None, None, None, None, None, None


# A convolution as a matrix product (im2col): on the CPU, oneDNN first reorders a plain weight into
# its blocked layout, forward and backward, on every call. For a large kernel over few output
# positions that copy costs more than the arithmetic: SD 1.5's 1280-channel 3x3 convolutions at 8x8
# and 16x16 take 1.5-4x less time forward and up to 2.7x less backward as one GEMM on the weight as
# it is (2-core Sapphire Rapids CPU, fp32). At 32x32 and above the convolution is faster again.
# Inference packs its weights once instead (`Conv2d.pack_for_cpu`); this is for a frozen weight
# while training, where the weight must stay plain for the backward. Not bit-identical to oneDNN
# (another summation order): fp32 rounding differences, 1e-5 relative.
_MATMUL_MAX_POSITIONS = 256  # output positions (H * W) per image
_MATMUL_MIN_REDUCTION = 9 * 1024  # in_channels * kernel area


def _conv_as_matmul_is_faster(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or groups != 1:
        return False
    if torch.is_autocast_enabled("cpu") or weight[0].numel() < _MATMUL_MIN_REDUCTION:
        return False
    return math.prod(_conv_output_size(x, weight, stride, padding, dilation)) <= _MATMUL_MAX_POSITIONS


def _conv_output_size(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation))


def _batched_matmul(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` for one matrix `a` and a batch `b` (N, K, M) as one matrix product: `a @ b` would
    go through bmm and first copy `a` out to every batch entry (the whole weight, per image)."""
    n, k, m = b.shape
    if n == 1:
        return (a @ b[0]).unsqueeze(0)
    return (a @ b.transpose(0, 1).reshape(k, n * m)).view(-1, n, m).transpose(0, 1)


def _conv2d_as_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    cols = F.unfold(x, weight.shape[2:], dilation, padding, stride)  # (N, C*kh*kw, positions)
    out = _batched_matmul(weight.flatten(1), cols)
    if bias is not None:
        out += bias[:, None]
    out = out.view(x.shape[0], weight.shape[0], *_conv_output_size(x, weight, stride, padding, dilation))
    return out.contiguous(memory_format=memory_format_of(x))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and keys) that keeps no input for backward when it is frozen,
    and whose frozen weight can be stored pre-packed for oneDNN on the CPU (`pack_for_cpu`)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.is_mkldnn:
            return self._packed_forward(x)
        if self._explicit_zero_padding() and _needs_input_grad_only(x, self.weight, self.bias):
            return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return super().forward(x)

    def _explicit_zero_padding(self) -> bool:
        return self.padding_mode == "zeros" and not isinstance(self.padding, str)

    # Pre-packed weights (inference on the CPU).
    #
    # oneDNN computes a convolution with the weight in a blocked layout of its own (OIhw16i16o and
    # the like). Given a plain weight, every call first reorders it into that layout: a full read
    # and write of the weight, which at the UNet's low resolutions (8x8 and 16x16 latents, 1280
    # channels) costs more than the convolution. Packing once keeps the weight in the blocked
    # layout, in the parameter itself (no second copy): an SD 1.5 UNet step at 512 px runs 8% faster
    # in fp32 and 10% in bf16 on a Sapphire Rapids CPU, with bit-identical outputs. The packed
    # weight is what oneDNN would have computed with on every call, so nothing else changes.

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def pack_for_cpu(self) -> bool:
        """Store the weight in oneDNN's blocked layout; returns whether it did.

        Only frozen CPU weights in fp32 or bf16 (where the CPU runs bf16) with zero padding are
        packed; channel counts under 16 are left plain (the layout pads channels to 16). A packed
        module still gives the plain weight to `state_dict()`, and moving or casting it (`.to`,
        `.float()`, ...) or loading a state dict unpacks it first.
        """
        w = self.weight
        if (self.packed or w.device.type != "cpu" or w.requires_grad or self.groups != 1
                or not self._explicit_zero_padding() or min(self.in_channels, self.out_channels) < 16
                or not cpu_packing_supported(w.dtype)):
            return False
        try:
            packed = self._packed_weight(w.detach())
        except (RuntimeError, TypeError):  # an older PyTorch without this signature: stay plain
            return False
        self.weight = nn.Parameter(packed, requires_grad=False)
        return True

    def packed_like_self(self, weight: Tensor) -> Tensor:
        """`weight` (plain) in the layout this module's weight has now: packed if it is packed."""
        return self._packed_weight(weight) if self.packed else weight

    def unpack(self) -> None:
        """Back to a plain (contiguous) weight."""
        if self.packed:
            self.weight = nn.Parameter(self.weight.to_dense(), requires_grad=False)

    def _packed_weight(self, weight: Tensor) -> Tensor:
        # The blocked layout oneDNN picks does not depend on the input's size (measured: the same
        # speed for weights packed for 8x8 and 64x64 inputs), so any representative size will do.
        example_input = [1, self.in_channels, 32, 32]
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), list(self.padding),
                                                         list(self.stride), list(self.dilation), self.groups,
                                                         example_input)

    def _packed_forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != self.weight.dtype or (torch.is_grad_enabled() and x.requires_grad):
            # Not what packing is for (another device or dtype, or a gradient wanted): the plain
            # convolution, correct if slower.
            return F.conv2d(x, self.weight.to_dense(), self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        if memory_format_of(x) != torch.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's packed path is NHWC
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, list(self.padding),
                                                       list(self.stride), list(self.dilation), self.groups,
                                                       "none", [], "")

    def _apply(self, fn, recurse: bool = True):
        self.unpack()  # the packed layout belongs to one device and dtype: casts and moves start plain
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = self.weight.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def cpu_packing_supported(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU run oneDNN convolutions on pre-packed `dtype` weights."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        torch.ops.mkldnn._convolution_pointwise  # noqa: B018 (present in builds with oneDNN)
    except (AttributeError, RuntimeError):
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_conv_weights(net: nn.Module) -> int:
    """`Conv2d.pack_for_cpu` on every convolution of `net` that allows it; returns how many."""
    return sum(m.pack_for_cpu() for m in net.modules() if isinstance(m, Conv2d))


class _GroupNormSiLU(torch.autograd.Function):
    """silu(group_norm(x)) that keeps x and the statistics, not the two full-size intermediates;
    the backward recomputes the norm's output (one more pass over x, the same kernel, the same bits)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
        x = native_group_norm_layout(x)
        n, c = x.shape[:2]
        hw = x.numel() // (n * c)
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.dims = (n, c, hw, groups, eps)
        return F.silu(y, inplace=True)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, hw, groups, eps = ctx.dims
        y = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)[0]
        dy = torch.ops.aten.silu_backward(grad, y)
        del y
        dx, dw, db = torch.ops.aten.native_group_norm_backward(dy, x, mean, rstd, weight, n, c, hw, groups,
                                                               list(ctx.needs_input_grad[:3]))
        return dx, dw, db, None, None


def group_norm_silu(x: Tensor, norm: GroupNorm32) -> Tensor:
    """`F.silu(norm(x))`, saving less for backward while training (see `_GroupNormSiLU`)."""
    if (torch.is_grad_enabled() and norm.weight is not None and norm.weight.dtype == x.dtype
            and (x.requires_grad or norm.weight.requires_grad)):
        return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    return F.silu(norm(x))


class _GEGLU(torch.autograd.Function):
    """`x * gelu(gate)` for `x, gate = h.chunk(2, -1)`, keeping only h (autograd would also keep
    gelu(gate)); the backward recomputes gelu(gate)."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        x, gate = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.gelu(gate).mul_(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        return _GEGLU.backward_from(grad, h)

    @staticmethod
    def backward_from(grad: Tensor, h: Tensor) -> Tensor:
        x, gate = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        dx, dgate = dh.chunk(2, dim=-1)
        torch.mul(grad, F.gelu(gate), out=dx)
        torch.ops.aten.gelu_backward.grad_input(grad * x, gate, grad_input=dgate)
        return dh


def geglu(h: Tensor) -> Tensor:
    """The GEGLU gate, `x * gelu(gate)` with `x, gate = h.chunk(2, -1)`."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _GEGLU.apply(h)
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate)


class _FrozenGEGLUFeedForward(torch.autograd.Function):
    """`out(geglu(proj(x)))` with both Linears frozen, keeping only `x` for backward.

    Autograd would keep proj(x), eight times the size of x; the backward here computes it again
    (two thirds of the feed-forward's forward FLOPs). Tokens go through in slices, so the
    intermediates never exist at full size. Same kernels per slice as the plain modules."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, rows: int) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], w2.shape[0])
        for start in range(0, flat.shape[0], rows):
            part = slice(start, start + rows)
            gated = geglu(F.linear(flat[part], w1, b1))
            if b2 is None:
                torch.mm(gated, w2.t(), out=out[part])
            else:
                torch.addmm(b2, gated, w2.t(), out=out[part])
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.rows = rows
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, b1, w2 = ctx.saved_tensors
        flat, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dx = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            h = F.linear(flat[part], w1, b1)
            dh = _GEGLU.backward_from(flat_grad[part] @ w2, h)
            del h
            torch.mm(dh, w1, out=dx[part])
        return dx.view(x.shape), None, None, None, None, None


def frozen_geglu_feed_forward(x: Tensor, proj: nn.Linear, out: nn.Linear, rows: int) -> Tensor | None:
    """`out(geglu(proj(x)))` keeping only x for backward (see `_FrozenGEGLUFeedForward`), or None
    where that does not apply: no gradient wanted, trainable or hooked layers (LoRA), autocast."""
    layers = (proj, out)
    params = [p for m in layers for p in m.parameters()]
    if not _needs_input_grad_only(x, *params) or torch.is_autocast_enabled(x.device.type):
        return None
    if any(p.dtype != x.dtype for p in params) or any(m._forward_hooks or m._forward_pre_hooks for m in layers):
        return None
    return _FrozenGEGLUFeedForward.apply(x, proj.weight, proj.bias, out.weight, out.bias, rows)
