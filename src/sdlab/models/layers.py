"""Primitives shared by more than one network: the attention function,
sinusoidal timestep embeddings and the GroupNorm used by the LDM code."""

import contextlib
import math
from collections.abc import Callable, Iterator

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


def upsample_nearest_2x(x: Tensor) -> Tensor:
    """F.interpolate(x, scale_factor=2, mode="nearest"), the same numbers (and gradient), in x's
    layout. The forward is one broadcast copy: PyTorch's CPU kernel first copies its input and then
    takes 5-15 ms more for SD 1.5's 640-channel 32x32 map, the copy 1 ms (SD 1.5 training step:
    22 -> 3 ms). The backward is interpolate's own, which beats summing over the broadcast 4x."""
    return _UpsampleNearest2x.apply(x)


class _UpsampleNearest2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        n, c, h, w = ctx.size = x.shape
        if memory_format_of(x) == torch.channels_last:
            pixels = x.permute(0, 2, 3, 1)
            return pixels[:, :, None, :, None].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        n, c, h, w = ctx.size
        return torch.ops.aten.upsample_nearest2d_backward(grad, [2 * h, 2 * w], [n, c, h, w], 2.0, 2.0)


def native_group_norm_layout(x: Tensor) -> Tensor:
    """`x` in a dense layout `torch.native_group_norm` takes on its device (F.group_norm
    ensures this itself): the CPU kernel takes channels-last too, CUDA's the usual layout alone."""
    if x.is_contiguous() or (x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on this kind of device, or None where it is off (or has no
    autocast at all, as the meta device)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A block where autocast is off (a no-op where it is off already)."""
    return torch.autocast(device_type, enabled=False) if autocast_dtype(device_type) else contextlib.nullcontext()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are always accumulated in float32 (the LDM code's GroupNorm32).

    LDM upcasts fp16/bf16 activations to fp32 and back around the norm. PyTorch's CPU and CUDA
    group_norm kernels already accumulate half-precision inputs in fp32 and round only the
    output, so when input and weights share a dtype the native kernel gives the same numbers
    without the two extra full-size copies (about 3x faster on a bf16 CPU path). Mixed dtypes
    (e.g. fp32 weights under autocast) still take the explicit upcast. Matching dtypes run
    natively under autocast too, which would otherwise upcast x and keep that fp32 copy for backward.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or self.weight.dtype == x.dtype:
            with without_autocast(x.device.type):
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


def _needs_grad(x: Tensor, *params: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))


class _Recomputation:
    """What autograd keeps in place of a tensor it can compute again: computed at most once
    in backward, shared by every node that kept the tensor, freed with the last of them.
    Backward runs without autocast, so the computation runs under the forward's autocast (or none)."""

    def __init__(self, compute: Callable[[], Tensor], device_type: str):
        self.compute, self.value = compute, None
        self.device_type, self.autocast = device_type, autocast_dtype(device_type)

    def get(self) -> Tensor:
        if self.value is None:
            autocast = (torch.autocast(self.device_type, self.autocast) if self.autocast
                        else without_autocast(self.device_type))
            with torch.no_grad(), autocast:
                self.value = self.compute()
        return self.value


def _saved_tensors_hooks_active() -> bool:
    """Whether an enclosing saved-tensor hook (gradient checkpointing's) is in force. Hooks do not
    nest: inside, ours would take every tensor saved from it, and the checkpoint would keep them
    all. Unknown (another PyTorch) counts as active."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


@contextlib.contextmanager
def recomputed_for_backward(t: Tensor, compute: Callable[[], Tensor]) -> Iterator[None]:
    """Within the block, wherever autograd would keep `t` (or a view of it) for backward, keep
    `compute` instead and call it there; `compute()` must give `t` again, in the same layout.

    For a cheap function of a tensor that is kept anyway: a LoRA on the attention keeps the
    LayerNorm output it reads, the LayerNorm already keeps its input, and computing the norm
    again costs far less than keeping both (0.1 GiB of an SD 1.5 step at 512 px)."""
    if not (torch.is_grad_enabled() and t.requires_grad) or _saved_tensors_hooks_active():
        yield
        return
    # The hooks live as long as what they saved, so they refer to t's storage address and offset
    # only: holding t itself would keep it alive, which is what this is to avoid.
    storage, base_offset = t.untyped_storage().data_ptr(), t.storage_offset()
    recomputation = _Recomputation(compute, t.device.type)

    def pack(saved: Tensor):
        if saved.untyped_storage().data_ptr() != storage:
            return saved
        return recomputation, saved.shape, saved.stride(), saved.storage_offset() - base_offset

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        recomputation, shape, stride, offset = packed
        value = recomputation.get()
        return value.as_strided(shape, stride, value.storage_offset() + offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


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
            return _conv2d_input_grad_as_matmul(grad, weight, ctx.x_shape, stride, padding, dilation).contiguous(
                memory_format=ctx.x_format), None, None, None, None, None, None
        if _flipped_conv_is_faster(grad, weight, stride, padding, dilation, groups):
            # The input gradient of a stride-1 convolution is the convolution of the output
            # gradient with the weight transposed (in and out channels) and flipped (kh, kw).
            c_out, c_in, *kernel = weight.shape
            # Reversing the flattened taps flips both axes; 5x faster than flip(2, 3) on the
            # transposed view, whose strided result F.conv2d would copy once more.
            flipped = weight.view(c_out, c_in, -1).flip(-1).transpose(0, 1).reshape(c_in, c_out, *kernel)
            pad = [d * (k - 1) - p for d, k, p in zip(dilation, weight.shape[2:], padding)]
            dx = F.conv2d(grad, flipped, None, 1, pad, dilation)
            return dx.contiguous(memory_format=ctx.x_format), None, None, None, None, None, None
        # The input gradient reads only the input's shape and layout, so an uninitialised stand-in
        # will do (never touched, so it costs no memory traffic). Not torch.nn.grad.conv2d_input's
        # expanded one-element tensor: convolution_backward would first copy that to full size.
        shape_only = torch.empty(ctx.x_shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.x_format)
        # Under autocast the forward ran in grad's dtype: recast the weight rather than keep a copy.
        dx = torch.ops.aten.convolution_backward(grad, shape_only, weight.to(grad.dtype), None, stride, padding,
                                                 dilation, False, [0], groups, (True, False, False))[0]
        return dx, None, None, None, None, None, None


# oneDNN's forward convolution runs faster than its backward-data one (NCHW, fp32, 2-core Sapphire
# Rapids): SD 1.5's 3x3 input gradients at 64x64 take 6-13% less time as a forward convolution
# with the weight flipped (40 ms of a 512 px step). Flipping copies the weight on each call, which
# at 32x32 and below takes what the faster convolution gains, or more for large weights (1280
# channels); 1x1 kernels gain nothing. Another summation order than convolution_backward: fp32
# rounding differences, 1e-5 relative.
_FLIP_MIN_POSITIONS = 4096  # output positions (H * W) per image
_FLIP_MAX_WEIGHT = 640 * 640 * 9  # elements


def _flipped_conv_is_faster(grad: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    kernel = weight.shape[2:]
    return (grad.device.type == "cpu" and grad.dtype == weight.dtype == torch.float32 and groups == 1
            and tuple(stride) == (1, 1) and all(p <= d * (k - 1) for p, d, k in zip(padding, dilation, kernel))
            and math.prod(kernel) > 1 and weight.numel() <= _FLIP_MAX_WEIGHT
            and math.prod(grad.shape[2:]) >= _FLIP_MIN_POSITIONS)


# A convolution as a matrix product (im2col): on the CPU, oneDNN first reorders a plain weight into
# its blocked layout, forward and backward, on every call. For a large kernel over few output
# positions that copy costs more than the arithmetic: SD 1.5's 1280-channel 3x3 convolutions at 8x8
# and 16x16 take 1.5-4x less time forward and up to 2.7x less backward as one GEMM on the weight as
# it is (2-core Sapphire Rapids CPU, fp32). At 32x32 and above the convolution is faster again.
# On an AVX-512 CPU inference packs its weights once instead (`Conv2d.pack_for_cpu`); this is for a
# frozen weight while training, where the weight must stay plain for the backward, and for
# inference where the weights stay plain (an AVX2 CPU). There, forward only, the GEMM gains at 8x8
# alone: in SD 1.5's 512 px fp32 step (batch 2, channels-last, a 2-core AMD EPYC) it takes 1.4 s
# off the convolutions for 0.5 s more matrix products and 0.3-0.7 s of im2col copies, 4% of the
# step; at 16x16 the products and copies cost what the convolutions gain.
# A 1x1 convolution (the ResBlocks' skip projections) needs no im2col at all and is faster as a GEMM
# at every size while training: SD 1.5's take 174 instead of 117 ms per 512 px step, forward and
# backward, the 640->320 ones at 64x64 3x less. Not for inference: forward alone, oneDNN's 1x1
# convolution is as fast or faster (AVX2 EPYC). Not bit-identical to oneDNN (another summation
# order): fp32 rounding differences, 1e-5 relative.
_MATMUL_MAX_POSITIONS = 256  # output positions (H * W) per image
_INFERENCE_MATMUL_MAX_POSITIONS = 64
_MATMUL_MIN_REDUCTION = 9 * 1024  # in_channels * kernel area


def _conv_as_matmul_is_faster(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    """For a frozen convolution while training (forward and input gradient)."""
    if _is_pointwise(weight, stride, padding):
        return _cpu_fp32(x, weight, groups)
    return _wide_conv_over_few_positions(x, weight, stride, padding, dilation, groups, _MATMUL_MAX_POSITIONS)


def _wide_conv_over_few_positions(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                                  max_positions: int) -> bool:
    return (_cpu_fp32(x, weight, groups) and weight[0].numel() >= _MATMUL_MIN_REDUCTION
            and math.prod(_conv_output_size(x, weight, stride, padding, dilation)) <= max_positions)


def _cpu_fp32(x: Tensor, weight: Tensor, groups: int) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and groups == 1
            and not torch.is_autocast_enabled("cpu"))


def _is_pointwise(weight: Tensor, stride, padding) -> bool:
    """A 1x1 convolution without stride or padding: a matrix product at every position."""
    return weight.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and (padding == "valid" or tuple(padding) == (0, 0))


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


# With this few output positions in the whole batch (SD 1.5's 8x8 latents at batch 1) MKL runs the
# product faster with the positions as rows: 1.1x forward, 1.5x for the input gradient (2-core
# Sapphire Rapids, fp32, 1280 channels).
_MATMUL_POSITIONS_AS_ROWS = 64


def _conv2d_as_matmul(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    n, out_size = x.shape[0], _conv_output_size(x, weight, stride, padding, dilation)
    if _is_pointwise(weight, stride, padding):
        cols = x.flatten(2)  # the input is its own column matrix
    else:
        cols = _im2col(x, weight.shape[2:], out_size, stride, padding, dilation)  # (N, C*kh*kw, positions)
    w = weight.flatten(1)
    if n * math.prod(out_size) <= _MATMUL_POSITIONS_AS_ROWS:
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N*positions, C*kh*kw)
        out = rows @ w.t() if bias is None else torch.addmm(bias, rows, w.t())
        out = out.view(n, *out_size, -1).permute(0, 3, 1, 2)
    else:
        out = _batched_matmul(w, cols)
        if bias is not None:
            out += bias[:, None]
        out = out.view(n, -1, *out_size)
    return out.contiguous(memory_format=memory_format_of(x))


def _conv2d_input_grad_as_matmul(grad: Tensor, weight: Tensor, x_shape, stride, padding, dilation) -> Tensor:
    """The input gradient of a convolution: the weight's transpose times the output gradient,
    summed back over the kernel windows (col2im)."""
    n, _, *out_size = grad.shape
    c, (kh, kw) = weight.shape[1], weight.shape[2:]
    w = weight.flatten(1)
    if n * math.prod(out_size) <= _MATMUL_POSITIONS_AS_ROWS:
        rows = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1]) @ w  # (N*positions, C*kh*kw)
        cols = rows.view(n, *out_size, c, kh, kw).permute(0, 3, 4, 5, 1, 2)
    else:
        cols = _batched_matmul(w.t(), grad.flatten(2)).view(n, c, kh, kw, *out_size)
    if _is_pointwise(weight, stride, padding):
        return cols[:, :, 0, 0]
    return _col2im(cols, x_shape[2:], stride, padding, dilation)


# im2col and col2im as one strided copy (or add) per kernel tap: F.unfold and F.fold loop over
# channels one at a time on the CPU and take 2-5x longer for these shapes.

def _kernel_tap(i: int, j: int, out_size, stride, dilation) -> tuple[slice, slice]:
    """Where kernel tap (i, j) reads in the padded input, one element per output position."""
    (ho, wo), (sh, sw), (dh, dw) = out_size, stride, dilation
    return slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)


def _im2col(x: Tensor, kernel, out_size, stride, padding, dilation) -> Tensor:
    """F.unfold: (N, C*kh*kw, Ho*Wo)."""
    n, c = x.shape[:2]
    (kh, kw), (ph, pw) = kernel, padding
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    cols = x.new_empty(n, c, kh, kw, *out_size)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = padded[(..., *_kernel_tap(i, j, out_size, stride, dilation))]
    return cols.view(n, c * kh * kw, -1)


def _col2im(cols: Tensor, size, stride, padding, dilation) -> Tensor:
    """F.fold for `cols` viewed as (N, C, kh, kw, Ho, Wo), in whatever layout it has: the sum
    is gathered in the matching layout (channels-last when the channels vary fastest)."""
    n, c, kh, kw, *out_size = cols.shape
    (ph, pw), padded_size = padding, (size[0] + 2 * padding[0], size[1] + 2 * padding[1])
    if cols.stride(1) < cols.stride(5):
        image = cols.new_zeros(n, *padded_size, c).permute(0, 3, 1, 2)
    else:
        image = cols.new_zeros(n, c, *padded_size)
    for i in range(kh):
        for j in range(kw):
            image[(..., *_kernel_tap(i, j, out_size, stride, dilation))] += cols[:, :, i, j]
    return image[:, :, ph:ph + size[0], pw:pw + size[1]]


class _PackedForCpu:
    """What `Conv2d` and `Linear` share: a frozen CPU weight stored in oneDNN's blocked layout.

    oneDNN computes with the weight in a blocked layout of its own (OIhw16i16o and the like).
    Given a plain weight, every call first reorders it into that layout: a full read and write of
    the weight. Packing once keeps the weight in the blocked layout, in the parameter itself (no
    second copy). The packed weight is what oneDNN would have computed with on every call, so
    nothing else changes. A packed module still gives the plain weight to `state_dict()`, and
    moving or casting it (`.to`, `.float()`, ...) or loading a state dict unpacks it first.
    Subclasses say which of their weights may be packed (`_packable`) and how (`_packed_weight`).
    """

    weight: nn.Parameter

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    def pack_for_cpu(self) -> bool:
        """Store the weight in oneDNN's blocked layout; returns whether it did. Only frozen CPU
        weights in fp32 or bf16 (where the CPU runs bf16) that the subclass allows are packed."""
        w = self.weight
        if (self.packed or w.device.type != "cpu" or w.requires_grad or not self._packable()
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

    def _packable(self) -> bool:
        raise NotImplementedError

    def _packed_weight(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _runs_packed(self, x: Tensor) -> bool:
        """Whether this call is what packing is for. Otherwise (another device or dtype, or a
        gradient wanted) the module computes with the plain weight: correct if slower."""
        return x.device.type == "cpu" and x.dtype == self.weight.dtype and not (
            torch.is_grad_enabled() and x.requires_grad)

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


class Conv2d(_PackedForCpu, nn.Conv2d):
    """nn.Conv2d (same parameters and keys) that keeps no input for backward when it is frozen,
    and whose frozen weight can be stored pre-packed for oneDNN on the CPU (`pack_for_cpu`).

    At the UNet's low resolutions (8x8 and 16x16 latents, 1280 channels) the reorder of a plain
    weight costs more than the convolution: with packed weights an SD 1.5 UNet step at 512 px
    runs 8% faster in fp32 and 10% in bf16 on a Sapphire Rapids CPU, with bit-identical outputs.
    Grouped convolutions, other padding modes and channel counts under 16 (the layout pads
    channels to 16) stay plain.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.is_mkldnn:
            return self._packed_forward(x)
        if self._explicit_zero_padding():
            if _needs_input_grad_only(x, self.weight, self.bias):
                return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                           self.groups)
            if not _needs_grad(x, self.weight, self.bias) and _wide_conv_over_few_positions(
                    x, self.weight, self.stride, self.padding, self.dilation, self.groups,
                    _INFERENCE_MATMUL_MAX_POSITIONS):
                # Inference with a plain weight (no packing: an AVX2 CPU, or packing switched off).
                return _conv2d_as_matmul(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return super().forward(x)

    def _explicit_zero_padding(self) -> bool:
        return self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def _packable(self) -> bool:
        return self.groups == 1 and self._explicit_zero_padding() and min(self.in_channels, self.out_channels) >= 16

    def _packed_weight(self, weight: Tensor) -> Tensor:
        # The blocked layout oneDNN picks does not depend on the input's size (measured: the same
        # speed for weights packed for 8x8 and 64x64 inputs), so any representative size will do.
        example_input = [1, self.in_channels, 32, 32]
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), list(self.padding),
                                                         list(self.stride), list(self.dilation), self.groups,
                                                         example_input)

    def _packed_forward(self, x: Tensor) -> Tensor:
        if not self._runs_packed(x):
            return self._conv_forward(x, self.weight.to_dense(), self.bias)  # honours padding_mode
        padding = list(self.padding)
        if self.padding_mode != "zeros":  # switched after packing (`circular_padding`): pad first, as nn.Conv2d does
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), [0, 0]
        if memory_format_of(x) != torch.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's packed path is NHWC
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, padding,
                                                       list(self.stride), list(self.dilation), self.groups,
                                                       "none", [], "")


class Linear(_PackedForCpu, nn.Linear):
    """nn.Linear (same parameters and keys) whose frozen weight can be stored pre-packed for
    oneDNN on the CPU (`pack_for_cpu`), and which can run a following GELU inside the same oneDNN
    call (`gelu_tanh`).

    Measured on a 2-core AMD EPYC (Zen 4, AVX-512 BF16, PyTorch 2.13) with SD3-medium's matrices:
    over a 1024 px image's 8192 tokens 2-12% less time than F.linear in bf16 and 10% in fp32; over
    the 308 text tokens 30% less in fp32; 3x less for the adaLN's two-row products. Bit-identical
    in bf16 (2-D inputs); fp32 rounding differences (1e-5 relative) in fp32.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.is_mkldnn:
            if self._runs_packed(x):
                return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return F.linear(x, self.weight.to_dense(), self.bias)
        return F.linear(x, self.weight, self.bias)

    def gelu_tanh(self, x: Tensor) -> Tensor:
        """`F.gelu(self(x), approximate="tanh")`. On a packed weight, one oneDNN call that applies
        the GELU to the product before it is stored: no second pass over the wide output (an MLP's
        4x hidden width), and the GELU reads the fp32 accumulator instead of the rounded output.
        Not where something observes this module's output (a forward hook, as training LoRA sets,
        or a replaced forward): they get the product itself, as without packing."""
        if (self.weight.is_mkldnn and self._runs_packed(x) and not self._forward_hooks
                and not self._forward_pre_hooks and "forward" not in self.__dict__):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "tanh")
        return F.gelu(self(x), approximate="tanh")

    def _packable(self) -> bool:
        return min(self.in_features, self.out_features) >= 16

    def _packed_weight(self, weight: Tensor) -> Tensor:
        # The second argument is the expected row count; measured: the same speed whatever it is.
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1024)


def cpu_packing_supported(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and CPU run oneDNN convolutions and linear layers on pre-packed
    `dtype` weights."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:  # present in builds with oneDNN
        torch.ops.mkldnn._convolution_pointwise  # noqa: B018
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_packing_pays(dtype: torch.dtype) -> bool:
    """Whether pre-packed `dtype` weights run faster than plain ones here (see `_PackedForCpu`).

    Packing gains on AVX-512 CPUs (8-10% of a UNet step, Sapphire Rapids; `Linear` has its
    figures). On an AVX2-only CPU (a
    2-core AMD EPYC, PyTorch 2.13 with oneDNN 3.12) oneDNN's convolutions on packed weights are the
    slow ones: SD 1.5's 1280-channel 3x3 convolutions at 16x16 and 8x8 take 5-8x longer, and the
    fp32 512 px UNet step twice as long as with plain channels-last weights.
    """
    return cpu_packing_supported(dtype) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def pack_weights_for_cpu(net: nn.Module) -> int:
    """`pack_for_cpu` on every `Conv2d` and `Linear` of `net` that allows it; returns how many."""
    return sum(m.pack_for_cpu() for m in net.modules() if isinstance(m, _PackedForCpu))


def unpack_weights(net: nn.Module) -> int:
    """`unpack` on every packed `Conv2d` and `Linear` of `net`; returns how many. For code that
    changes parameters in place (`p.data = ...`), which `_apply` does not see."""
    packed = [m for m in net.modules() if isinstance(m, _PackedForCpu) and m.packed]
    for m in packed:
        m.unpack()
    return len(packed)


@contextlib.contextmanager
def circular_padding(*nets: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every padded convolution of `nets` pads by wrapping around (the map's
    opposite edge) instead of with zeros: a UNet and VAE switched so make images that tile
    seamlessly, the web UI's "Tiling" (`sd_hijack.apply_circular` sets every Conv2d's
    `padding_mode`; convolutions without padding are left alone here, the same numbers). The
    modes are restored on leaving; with `enabled` False nothing changes."""
    switched = []
    if enabled:
        for net in nets:
            for m in net.modules():
                if isinstance(m, nn.Conv2d) and not isinstance(m.padding, str) and any(m.padding):
                    switched.append((m, m.padding_mode))
                    m.padding_mode = "circular"
    try:
        yield
    finally:
        for m, mode in switched:
            m.padding_mode = mode


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
        # Written into dh's halves in place: no temporaries the size of a half.
        torch.ops.aten.gelu.out(gate, out=dx)
        dx.mul_(grad)
        torch.mul(grad, x, out=dgate)
        torch.ops.aten.gelu_backward.grad_input(dgate, gate, grad_input=dgate)
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
    (two thirds of the feed-forward's forward FLOPs). Tokens go through in slices of `rows`, so the
    intermediates never exist at full size. Same kernels per slice as the plain modules, in
    `dtype`: x's own, or under autocast the autocast dtype, to which x is cast as autocast would
    (x itself is kept, so a LayerNorm output recomputed for backward stays free)."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, rows: int,
                dtype: torch.dtype) -> Tensor:
        with without_autocast(x.device.type):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            out = flat.new_empty(flat.shape[0], w2.shape[0])
            for start in range(0, flat.shape[0], rows):
                part = slice(start, start + rows)
                gated = geglu(F.linear(flat[part], w1, b1))
                if b2 is None:
                    torch.mm(gated, w2.t(), out=out[part])
                else:
                    torch.addmm(b2, gated, w2.t(), out=out[part])
        ctx.save_for_backward(x, w1, b1, w2)
        ctx.rows, ctx.dtype = rows, dtype
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, b1, w2 = ctx.saved_tensors
        with without_autocast(x.device.type):
            flat, flat_grad = x.reshape(-1, x.shape[-1]).to(ctx.dtype), grad.reshape(-1, grad.shape[-1])
            dx = torch.empty_like(flat)
            for start in range(0, flat.shape[0], ctx.rows):
                part = slice(start, start + ctx.rows)
                h = F.linear(flat[part], w1, b1)
                dh = _GEGLU.backward_from(flat_grad[part] @ w2, h)
                del h
                torch.mm(dh, w1, out=dx[part])
        return dx.view(x.shape).to(x.dtype), None, None, None, None, None, None


def frozen_geglu_feed_forward(x: Tensor, proj: nn.Linear, out: nn.Linear, rows: int) -> Tensor | None:
    """`out(geglu(proj(x)))` keeping only x for backward (see `_FrozenGEGLUFeedForward`), or None
    where that does not apply: no gradient wanted, trainable or hooked layers (LoRA), weights in
    another dtype than the computation's (which autocast would cast on every call)."""
    layers = (proj, out)
    params = [p for m in layers for p in m.parameters()]
    if not _needs_input_grad_only(x, *params):
        return None
    dtype = autocast_dtype(x.device.type) or x.dtype
    if any(p.dtype != dtype for p in params) or any(m._forward_hooks or m._forward_pre_hooks for m in layers):
        return None
    return _FrozenGEGLUFeedForward.apply(x, proj.weight, proj.bias, out.weight, out.bias, rows, dtype)


# A transformer block over a feature map turns pixels into tokens with a 1x1 convolution and back
# with another (SD 1.x's proj_in / proj_out). In NCHW each comes with a transposing copy, forward
# and backward. Frozen, each is one matrix product per image that reads the one layout and writes
# the other directly, 1.2-2x faster on the CPU (SD 1.5 at 512 px: 180 instead of 260 ms per
# training step, fp32, 2-core Sapphire Rapids).


class _PixelsToTokens(torch.autograd.Function):
    """(N, C, H, W) -> (N, H*W, C_out) through a frozen 1x1 convolution's weight and bias."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.size = x.shape[2:]
        n, c = x.shape[:2]
        w = weight.view(-1, c)
        tokens = x.new_empty(n, x[0, 0].numel(), w.shape[0])
        for image, out in zip(x.view(n, c, -1), tokens):
            if bias is None:
                torch.mm(image.t(), w.t(), out=out)
            else:
                torch.addmm(bias, image.t(), w.t(), out=out)
        return tokens

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        n, positions, c_out = grad.shape
        w = weight.view(c_out, -1)
        dx = grad.new_empty(n, w.shape[1], positions)
        for g, out in zip(grad, dx):
            torch.mm(w.t(), g.t(), out=out)
        return dx.view(n, -1, *ctx.size), None, None


class _TokensToPixels(torch.autograd.Function):
    """(N, H*W, C) -> (N, C_out, H, W) through a frozen 1x1 convolution's weight and bias."""

    @staticmethod
    def forward(ctx, tokens: Tensor, weight: Tensor, bias: Tensor | None, size: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(weight)
        n, _, c = tokens.shape
        w = weight.view(-1, c)
        pixels = tokens.new_empty(n, w.shape[0], tokens.shape[1])
        for t, out in zip(tokens, pixels):
            if bias is None:
                torch.mm(w, t.t(), out=out)
            else:
                torch.addmm(bias[:, None], w, t.t(), out=out)
        return pixels.view(n, -1, *size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (weight,) = ctx.saved_tensors
        n, c_out = grad.shape[:2]
        w = weight.view(c_out, -1)
        dt = grad.new_empty(n, grad[0, 0].numel(), w.shape[1])
        for g, out in zip(grad.reshape(n, c_out, -1), dt):
            torch.mm(g.t(), w, out=out)
        return dt, None, None, None


def _frozen_projection_as_matmul(x: Tensor, conv: Conv2d) -> bool:
    return (x.device.type == "cpu" and x.is_contiguous() and not torch.is_autocast_enabled("cpu")
            and _needs_input_grad_only(x, conv.weight, conv.bias) and not conv.packed and x.dtype == conv.weight.dtype
            and _is_pointwise(conv.weight, conv.stride, conv.padding) and conv.groups == 1
            and not (conv._forward_hooks or conv._forward_pre_hooks))


def pixels_to_tokens(x: Tensor, conv: Conv2d) -> Tensor:
    """`conv(x)` (a 1x1 convolution) as contiguous (N, H*W, C) tokens."""
    if _frozen_projection_as_matmul(x, conv):
        return _PixelsToTokens.apply(x, conv.weight, conv.bias)
    return conv(x).flatten(2).transpose(1, 2).contiguous()


def tokens_to_pixels(tokens: Tensor, conv: Conv2d, size: tuple[int, int], memory_format: torch.memory_format) -> Tensor:
    """`conv` (a 1x1 convolution) of (N, H*W, C) tokens laid out as an (N, C, H, W) map in `memory_format`."""
    if memory_format == torch.contiguous_format and _frozen_projection_as_matmul(tokens, conv):
        return _TokensToPixels.apply(tokens, conv.weight, conv.bias, size)
    x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *size).contiguous(memory_format=memory_format)
    return conv(x)
