"""The frozen-base training layers of `models/layers.py`: the same numbers as the plain ops,
bit for bit (the matmul convolution and the flipped-conv input gradient: to fp32 rounding), with less kept for backward."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlab.models import layers
from sdlab.models.layers import _conv2d_as_matmul
from sdlab.models.layers import (Conv2d, GroupNorm32, Linear, cpu_packing_supported, geglu, group_norm_silu,
                                 pack_weights_for_cpu)


def _saved_bytes(fn, *params: torch.Tensor) -> int:
    """Bytes of the activations autograd keeps for backward while `fn()` runs (parameters excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _grads(fn, x: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    return out.detach(), [x.grad] + [p.grad for p in params]


def _same(a, b, exact: bool = True) -> None:
    """Equal outputs and gradients: bit for bit, or (`exact=False`) to fp32 summation order."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    tensors_a, tensors_b = [out_a, *grads_a], [out_b, *grads_b]
    for ta, tb in zip(tensors_a, tensors_b):
        assert (ta is None) == (tb is None)
        if ta is None:
            continue
        if exact:
            assert torch.equal(ta, tb)
        else:
            torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("args, shape", [
    ({"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": 1}, (2, 8, 9, 7)),
    ({"in_channels": 8, "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1}, (1, 8, 9, 9)),
    ({"in_channels": 8, "out_channels": 16, "kernel_size": 1, "bias": False}, (2, 8, 5, 5)),
    ({"in_channels": 8, "out_channels": 16, "kernel_size": 3, "padding": "same"}, (1, 8, 6, 6)),
])
def test_conv_equals_the_plain_layer(args, shape, frozen):
    torch.manual_seed(0)
    ours = Conv2d(**args).requires_grad_(not frozen)
    plain = nn.Conv2d(**args).requires_grad_(not frozen)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(shape)
    # A frozen 1x1 convolution runs as a matrix product (`_conv_as_matmul_is_faster`): MKL's
    # summation order, not oneDNN's. Which bits differ depends on the CPU's instruction set (equal
    # on an AVX512 CPU, 1 ulp apart on an AVX2 one), so that path is held to fp32 rounding.
    as_matmul = frozen and layers._conv_as_matmul_is_faster(x, ours.weight, ours.stride, ours.padding,
                                                            ours.dilation, ours.groups)
    _same(_grads(ours, x, list(ours.parameters())), _grads(plain, x, list(plain.parameters())), exact=not as_matmul)


def test_frozen_conv_keeps_no_input():
    conv = Conv2d(16, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    assert _saved_bytes(lambda: conv(x), *conv.parameters()) == 0
    # nn.Conv2d keeps the input for a weight gradient that is never computed (nn.Linear does not)
    assert _saved_bytes(lambda: F.conv2d(x, conv.weight, conv.bias, padding=1), *conv.parameters()) == x.nbytes
    lin = nn.Linear(16, 16).requires_grad_(False)
    assert _saved_bytes(lambda: lin(x.flatten(2).transpose(1, 2)), *lin.parameters()) == 0


def test_frozen_conv_under_autocast_matches_the_plain_layer():
    torch.manual_seed(0)
    ours = Conv2d(8, 16, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _grads(ours, x, [])
        b = _grads(lambda t: F.conv2d(t, ours.weight, ours.bias, padding=1), x, [])
    assert a[0].dtype == torch.bfloat16 and a[1][0].dtype == torch.float32
    _same(a, b)


@pytest.mark.parametrize("batch, size, stride, dilation, channels_last", [
    (1, (6, 5), 1, 1, False),  # few positions: the product runs with the positions as rows
    (2, (6, 5), 1, 1, False),
    (2, (6, 5), 2, 1, True),
    (1, (10, 9), 1, 1, False),  # more positions: the weight's rows as rows
    (2, (11, 10), 2, 2, True),
])
def test_frozen_wide_conv_over_few_positions_runs_as_a_matmul(batch, size, stride, dilation, channels_last):
    """A large kernel over a small feature map (SD 1.5's 1280-channel convs at 8x8) runs as
    im2col + one GEMM while training: the same numbers as oneDNN's convolution up to fp32
    summation order, the same layout out, and still nothing kept for backward."""
    torch.manual_seed(0)
    _check_conv_as_matmul(Conv2d(1024, 32, 3, stride=stride, padding=1, dilation=dilation), (batch, 1024, *size),
                          channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_conv_over_an_8x8_map_runs_as_a_matmul(monkeypatch, channels_last):
    """Without gradients and with a plain weight (no packing: an AVX2 CPU), a wide convolution over
    at most 8x8 outputs runs as im2col + one GEMM (F.conv2d's numbers to fp32 rounding, in the
    input's layout); over 16x16 it stays oneDNN's convolution."""
    torch.manual_seed(0)
    conv = Conv2d(1024, 32, 3, padding=1).requires_grad_(False)
    calls = []
    monkeypatch.setattr(layers, "_conv2d_as_matmul",
                        lambda *a: calls.append(a[0].shape[-1]) or _conv2d_as_matmul(*a))
    for size, as_matmul in [(8, True), (16, False)]:
        x = torch.randn(2, 1024, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        calls.clear()
        with torch.no_grad():
            out, ref = conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)
        assert calls == ([size] if as_matmul else [])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert layers.memory_format_of(out) == layers.memory_format_of(x)
    # a weight that trains still takes nn.Conv2d's own path (it needs the weight gradient)
    conv.requires_grad_(True)
    calls.clear()
    conv(torch.randn(1, 1024, 8, 8)).sum().backward()
    assert calls == [] and conv.weight.grad is not None


def _check_conv_as_matmul(conv: Conv2d, shape, channels_last: bool) -> None:
    """The frozen `conv` takes the matmul path and gives F.conv2d's output and input gradient (to fp32
    rounding), in the input's layout, keeping nothing for backward."""

    conv.requires_grad_(False)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert layers._conv_as_matmul_is_faster(x, conv.weight, conv.stride, conv.padding, conv.dilation, 1)
    (out, (dx,)), (ref, (ref_dx,)) = _grads(conv, x, []), _grads(
        lambda t: F.conv2d(t, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation), x, [])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    assert layers.memory_format_of(out) == layers.memory_format_of(x) == layers.memory_format_of(dx)
    xr = x.detach().requires_grad_()
    assert _saved_bytes(lambda: conv(xr), *conv.parameters()) == 0


@pytest.mark.parametrize("padding, dilation, channels_last", [(1, 1, False), (2, 2, True), (0, 1, False)])
def test_frozen_conv_input_grad_over_many_positions_as_a_flipped_conv(padding, dilation, channels_last):
    """Over a large map (SD 1.5's 3x3 convs at 64x64) the input gradient is computed as a forward
    convolution with the flipped, transposed weight: equal to the convolution's own gradient up
    to fp32 summation order, in the input's layout."""

    torch.manual_seed(0)
    conv = Conv2d(8, 16, 3, padding=padding, dilation=dilation).requires_grad_(False)
    x = torch.randn(2, 8, 68, 66)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out_positions = math.prod(F.conv2d(x, conv.weight, padding=padding, dilation=dilation).shape[2:])
    assert out_positions >= layers._FLIP_MIN_POSITIONS
    (out, (dx,)), (ref, (ref_dx,)) = _grads(conv, x, []), _grads(
        lambda t: F.conv2d(t, conv.weight, conv.bias, 1, padding, dilation), x, [])
    assert torch.equal(out, ref)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    assert layers.memory_format_of(dx) == layers.memory_format_of(x)


def test_flipped_conv_only_where_it_is_faster():
    from sdlab.models.layers import _flipped_conv_is_faster as faster

    grad, w = torch.zeros(1, 320, 64, 64), torch.zeros(320, 320, 3, 3)
    assert faster(grad, w, (1, 1), (1, 1), (1, 1), 1)
    assert not faster(grad, w, (2, 2), (1, 1), (1, 1), 1)  # strided
    assert not faster(grad, torch.zeros(320, 320, 1, 1), (1, 1), (0, 0), (1, 1), 1)  # 1x1: no gain
    assert not faster(torch.zeros(1, 1280, 64, 64), torch.zeros(1280, 1280, 3, 3), (1, 1), (1, 1), (1, 1), 1)  # big weight
    assert not faster(torch.zeros(1, 320, 32, 32), w, (1, 1), (1, 1), (1, 1), 1)  # a smaller map
    assert not faster(grad.bfloat16(), w.bfloat16(), (1, 1), (1, 1), (1, 1), 1)


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 2), (2, 1), (0, 1), (2, 1)), ((4, 4), (2, 2), (1, 1), (1, 1)),
])
def test_im2col_and_col2im_equal_unfold_and_fold(kernel, stride, padding, dilation):
    """The per-tap copies and sums give F.unfold's and F.fold's numbers exactly, with the columns
    in either layout (channels or positions fastest)."""
    from sdlab.models.layers import _col2im, _conv_output_size, _im2col

    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 8)
    out_size = _conv_output_size(x, torch.empty(1, 5, *kernel), stride, padding, dilation)
    cols = _im2col(x, kernel, out_size, stride, padding, dilation)
    assert torch.equal(cols, F.unfold(x, kernel, dilation, padding, stride))
    folded = F.fold(cols, x.shape[2:], kernel, dilation, padding, stride)
    as_6d = cols.view(2, 5, *kernel, *out_size)
    assert torch.equal(_col2im(as_6d, x.shape[2:], stride, padding, dilation), folded)
    positions_fastest = as_6d.permute(0, 4, 5, 1, 2, 3).contiguous().permute(0, 3, 4, 5, 1, 2)
    assert torch.equal(_col2im(positions_fastest, x.shape[2:], stride, padding, dilation), folded)


@pytest.mark.parametrize("batch, size, channels_last", [(1, (8, 8), False), (2, (12, 9), False), (2, (12, 9), True)])
def test_frozen_pointwise_conv_runs_as_a_matmul(batch, size, channels_last):
    """A frozen 1x1 convolution (a ResBlock's skip projection) is a matrix product at any size:
    the convolution's numbers up to fp32 summation order, the input's layout, nothing kept."""
    torch.manual_seed(0)
    _check_conv_as_matmul(Conv2d(16, 24, 1), (batch, 16, *size), channels_last)


def test_conv_as_matmul_only_where_it_is_faster():
    from sdlab.models.layers import _conv_as_matmul_is_faster as faster

    w = torch.zeros(8, 1280, 3, 3)
    pad = ((1, 1), (1, 1), (1, 1))
    assert faster(torch.zeros(1, 1280, 16, 16), w, *pad, 1)
    assert not faster(torch.zeros(1, 1280, 32, 32), w, *pad, 1)  # many positions: oneDNN is faster
    assert faster(torch.zeros(1, 320, 64, 64), torch.zeros(8, 320, 1, 1), (1, 1), (0, 0), (1, 1), 1)  # 1x1: always
    assert not faster(torch.zeros(1, 320, 64, 64), torch.zeros(8, 320, 1, 1), (2, 2), (0, 0), (1, 1), 1)
    assert not faster(torch.zeros(1, 640, 8, 8), torch.zeros(8, 640, 3, 3), *pad, 1)  # a small kernel
    assert not faster(torch.zeros(1, 1280, 8, 8, dtype=torch.bfloat16), w.bfloat16(), *pad, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not faster(torch.zeros(1, 1280, 8, 8), w, *pad, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", [True, False])
def test_group_norm_silu_equals_norm_then_silu(frozen, dtype):
    torch.manual_seed(0)
    norm = GroupNorm32(4, 16).to(dtype).requires_grad_(not frozen)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    params = list(norm.parameters())
    x = torch.randn(2, 16, 6, 5).to(dtype)
    a = _grads(lambda t: group_norm_silu(t, norm), x, params)
    for p in params:
        p.grad = None
    _same(a, _grads(lambda t: F.silu(norm(t)), x, params))


def test_group_norm_silu_keeps_only_its_input():
    norm = GroupNorm32(4, 16).requires_grad_(False)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    stats = 2 * 2 * 4 * 4  # mean and rstd, (N, groups) fp32 each
    assert _saved_bytes(lambda: group_norm_silu(x, norm), *norm.parameters()) == x.nbytes + stats
    assert _saved_bytes(lambda: F.silu(norm(x)), *norm.parameters()) == 2 * x.nbytes + stats


def test_geglu_equals_the_plain_gate_and_keeps_only_its_input():
    torch.manual_seed(0)
    h = torch.randn(2, 9, 32)

    def plain(t):
        x, gate = t.chunk(2, dim=-1)
        return x * F.gelu(gate)

    _same(_grads(geglu, h, []), _grads(plain, h, []))
    hr = h.clone().requires_grad_()
    assert _saved_bytes(lambda: geglu(hr)) == h.nbytes
    assert _saved_bytes(lambda: plain(hr)) == h.nbytes * 3 // 2


# ---------------------------------------------------------------- pre-packed conv weights (CPU inference)


def assert_unpacked_by_state_dict_and_casts(module, weight):
    """A packed module's state dict holds the plain weight; loading one, or a cast, unpacks."""
    state = module.state_dict()
    assert not state["weight"].is_mkldnn and torch.equal(state["weight"], weight)
    module.load_state_dict(state)
    assert not module.packed and torch.equal(module.weight, weight)
    module.pack_for_cpu()
    module.float()
    assert not module.packed and torch.equal(module.weight, weight.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (1, 1)])
def test_packed_conv_equals_the_plain_conv(dtype, kernel, stride):
    if not cpu_packing_supported(dtype):
        pytest.skip(f"this PyTorch build or CPU has no oneDNN {dtype} convolutions")
    torch.manual_seed(0)
    conv = Conv2d(32, 48, kernel, stride=stride, padding=kernel // 2).to(dtype).requires_grad_(False)
    weight = conv.weight.detach().clone()
    x = torch.randn(2, 32, 12, 10, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = conv(x)
        assert conv.pack_for_cpu() and conv.packed and conv.weight.shape == weight.shape
        assert not conv.pack_for_cpu()  # once is enough
        # oneDNN computes with the layout it would have reordered the weight into: the same bits.
        assert torch.equal(conv(x), plain)
        assert torch.equal(conv(x.contiguous()), plain)  # NCHW input: made channels-last first
    # A gradient for the input takes the plain convolution (packed weights have no autograd).
    xg = x.detach().requires_grad_()
    conv(xg).float().square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert_unpacked_by_state_dict_and_casts(conv, weight)


def test_convs_that_are_not_packed():
    trainable = Conv2d(32, 32, 3, padding=1)  # requires grad: training, not inference
    grouped = Conv2d(32, 32, 3, padding=1, groups=2).requires_grad_(False)
    narrow = Conv2d(4, 32, 3, padding=1).requires_grad_(False)  # fewer than 16 channels
    same = Conv2d(32, 32, 3, padding="same").requires_grad_(False)
    half = Conv2d(32, 32, 3, padding=1).half().requires_grad_(False)
    assert not any(c.pack_for_cpu() for c in (trainable, grouped, narrow, same, half))
    assert pack_weights_for_cpu(nn.Sequential(Conv2d(32, 32, 1), Conv2d(32, 32, 1).requires_grad_(False))) == 1


# ---------------------------------------------------------------- pre-packed linear weights (CPU inference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_the_plain_linear(dtype):
    if not cpu_packing_supported(dtype):
        pytest.skip(f"this PyTorch build or CPU has no oneDNN {dtype} matrix products")
    torch.manual_seed(0)
    lin = Linear(48, 80).to(dtype).requires_grad_(False)
    weight = lin.weight.detach().clone()
    x = torch.randn(2, 7, 48, dtype=dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.02}
    with torch.no_grad():
        plain, plain_gelu = lin(x), F.gelu(lin(x), approximate="tanh")
        assert torch.equal(lin.gelu_tanh(x), plain_gelu)  # plain weight: the two ops
        assert lin.pack_for_cpu() and lin.packed and lin.weight.shape == weight.shape
        assert not lin.pack_for_cpu()  # once is enough
        torch.testing.assert_close(lin(x), plain, **tol)
        if dtype == torch.bfloat16:  # oneDNN computes with the layout it would have reordered into
            assert torch.equal(lin(x[0]), plain[0])
        # The fused GELU reads the fp32 accumulator: within bf16 rounding of the two-op result.
        torch.testing.assert_close(lin.gelu_tanh(x), plain_gelu, **tol)
        torch.testing.assert_close(lin(x.transpose(0, 1)), plain.transpose(0, 1), **tol)  # any strides
    # A gradient for the input takes the plain product (packed weights have no autograd).
    xg = x.detach().requires_grad_()
    lin.gelu_tanh(xg).float().square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert_unpacked_by_state_dict_and_casts(lin, weight)


def test_gelu_is_not_fused_where_a_hook_reads_the_output():
    """Training LoRA adds its output in a forward hook: it must get the product, not the GELU of
    it, packed weight or not."""
    if not cpu_packing_supported(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN matrix products")
    torch.manual_seed(0)
    lin = Linear(32, 64).requires_grad_(False)
    x = torch.randn(3, 32)
    seen = []
    with torch.no_grad():
        product = F.linear(x, lin.weight, lin.bias)
        assert lin.pack_for_cpu()
        handle = lin.register_forward_hook(lambda m, args, out: seen.append(out) or out + 1)
        out = lin.gelu_tanh(x)
        handle.remove()
    torch.testing.assert_close(seen[0], product, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, F.gelu(product + 1, approximate="tanh"), atol=1e-5, rtol=1e-5)


def test_linears_that_are_not_packed():
    trainable = Linear(32, 32)  # requires grad: training, not inference
    narrow = Linear(8, 32).requires_grad_(False)  # under 16 features
    half = Linear(32, 32).half().requires_grad_(False)
    assert not any(m.pack_for_cpu() for m in (trainable, narrow, half))
    if cpu_packing_supported(torch.float32):
        net = nn.Sequential(Linear(32, 32).requires_grad_(False), nn.Linear(32, 32).requires_grad_(False),
                            Conv2d(32, 32, 1).requires_grad_(False))
        assert pack_weights_for_cpu(net) == 2  # a plain nn.Linear is not ours to pack


# ---------------------------------------------------------------- circular padding (seamless images)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_circular_padding_wraps_every_padded_conv_for_the_block(packed, stride):
    """The web UI's Tiling: within the block every padded convolution pads by wrapping around
    (nn.Conv2d's own padding_mode="circular"), pre-packed ones too; an unpadded one is left alone,
    and the modes are back on leaving."""
    if packed and not cpu_packing_supported(torch.float32):
        pytest.skip("this PyTorch build or CPU has no oneDNN convolutions")
    torch.manual_seed(0)
    net = nn.Sequential(Conv2d(32, 32, 3, stride=stride, padding=1), nn.Conv2d(32, 32, 3, padding=1),
                        Conv2d(32, 32, 1)).requires_grad_(False)
    x = torch.randn(2, 32, 8, 12)

    def wrapped(x):  # the same layers, padded around by hand
        for m in net:
            pad = m.padding[0]
            x = F.conv2d(F.pad(x, (pad,) * 4, mode="circular") if pad else x, m.weight, m.bias, m.stride)
        return x

    with torch.no_grad():
        want = wrapped(x)
        if packed:
            assert pack_weights_for_cpu(net) == 2
        plain = net(x)
        with layers.circular_padding(net):
            assert [m.padding_mode for m in net] == ["circular", "circular", "zeros"]
            got = net(x)
        assert [m.padding_mode for m in net] == ["zeros"] * 3
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(net(x), plain)
        with layers.circular_padding(net, enabled=False):
            assert [m.padding_mode for m in net] == ["zeros"] * 3


# ---------------------------------------------------------------- the feed-forward that keeps only its input


def _feed_forward(dim: int = 16):
    from sdlab.models.unet import FeedForward

    torch.manual_seed(0)
    return FeedForward(dim).requires_grad_(False)


@pytest.mark.parametrize("chunk_bytes", [1, 16 * 2**20])  # 64-row slices (the least) / whole
def test_frozen_feed_forward_keeps_only_its_input(monkeypatch, chunk_bytes):
    from sdlab.models.unet import FeedForward

    ff = _feed_forward()
    monkeypatch.setattr(FeedForward, "RECOMPUTE_MAX_DIM", 16)
    monkeypatch.setattr(FeedForward, "CHUNK_BYTES", chunk_bytes)
    x = torch.randn(2, 75, 16)  # 150 rows: three slices of 64, 64 and 22
    ours, plain = _grads(ff, x, []), _grads(ff.net, x, [])
    for a, b in zip([ours[0], *ours[1]], [plain[0], *plain[1]]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    xr = x.clone().requires_grad_()
    assert _saved_bytes(lambda: ff(xr), *ff.parameters()) == x.nbytes
    assert _saved_bytes(lambda: ff.net(xr), *ff.parameters()) == 8 * x.nbytes  # proj(x): 2 x 4 x dim


def _under_autocast(fn):
    def run(*args):
        with torch.autocast("cpu", torch.bfloat16):
            return fn(*args)
    return run


@pytest.mark.parametrize("chunk_bytes", [1, 2**40])  # 64-row slices / whole (as on a GPU)
def test_frozen_feed_forward_under_autocast(monkeypatch, chunk_bytes):
    """Mixed-precision LoRA training (bf16 weights, bf16 autocast, an fp32 input): the lean
    feed-forward casts its input as autocast would, gives autocast's numbers and gradients, and
    keeps only the input itself."""
    from sdlab.models.unet import FeedForward

    ff = _feed_forward().to(torch.bfloat16)
    monkeypatch.setattr(FeedForward, "RECOMPUTE_MAX_DIM", 16)
    monkeypatch.setattr(FeedForward, "RECOMPUTE_CHUNK_BYTES", chunk_bytes)
    x = torch.randn(2, 75, 16)
    ours, plain = _grads(_under_autocast(ff), x, []), _grads(_under_autocast(ff.net), x, [])
    assert ours[0].dtype == torch.bfloat16 and ours[1][0].dtype == torch.float32
    _same(ours, plain)
    xr = x.clone().requires_grad_()
    assert _saved_bytes(lambda: _under_autocast(ff)(xr), *ff.parameters()) == x.nbytes
    assert _saved_bytes(lambda: _under_autocast(ff.net)(xr), *ff.parameters()) == 4 * x.nbytes  # bf16 proj(x)
    # Weights in another dtype than autocast's would be cast on every call: the plain modules run.
    wide = _feed_forward()
    assert _saved_bytes(lambda: _under_autocast(wide)(xr), *wide.parameters()) > x.nbytes


def test_norms_under_autocast_keep_no_fp32_copies(monkeypatch):
    """CUDA's autocast runs layer_norm and group_norm in fp32 (emulated here on the CPU, whose
    autocast does not): that keeps an fp32 copy of the input for backward and hands fp32 to the
    Linears after it, each casting again. The transformer's LayerNorms and GroupNorm32 with weights
    in the autocast dtype run in it instead (the kernels accumulate in fp32 either way), and a
    LayerNorm with fp32 weights has its output cast once."""
    from sdlab.models.unet import _norm_for_linears

    plain_layer_norm, plain_group_norm = F.layer_norm, F.group_norm

    def upcast(fn):
        def run(x, *args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                x, args = x.float(), [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return fn(x, *args, **kwargs)
        return run

    monkeypatch.setattr(F, "layer_norm", upcast(plain_layer_norm))
    monkeypatch.setattr(F, "group_norm", upcast(plain_group_norm))
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32, dtype=torch.bfloat16, requires_grad=True)
    norm = nn.LayerNorm(32).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    want = norm(x)
    got = _under_autocast(_norm_for_linears)(norm, x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert _saved_bytes(lambda: _under_autocast(_norm_for_linears)(norm, x), *norm.parameters()) < 1.1 * x.nbytes
    assert _saved_bytes(lambda: _under_autocast(norm)(x), *norm.parameters()) >= 2 * x.nbytes  # the fp32 copy
    wide = nn.LayerNorm(32)  # fp32 weights: autocast's fp32 output, cast once
    assert _under_autocast(_norm_for_linears)(wide, x).dtype == torch.bfloat16

    gn = GroupNorm32(4, 8).to(torch.bfloat16)
    y = torch.randn(1, 8, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    got = _under_autocast(gn)(y)
    assert got.dtype == torch.bfloat16 and torch.equal(got, gn(y))
    assert _saved_bytes(lambda: _under_autocast(gn)(y), *gn.parameters()) < 1.1 * y.nbytes


def test_feed_forward_keeps_the_plain_path_where_recomputing_does_not_apply(monkeypatch):
    from sdlab.models.unet import FeedForward

    monkeypatch.setattr(FeedForward, "RECOMPUTE_MAX_DIM", 16)
    x = torch.randn(1, 10, 16, requires_grad=True)
    wide = _feed_forward(32)  # wider than RECOMPUTE_MAX_DIM (SD's 640 and 1280 blocks)
    xw = torch.randn(1, 10, 32, requires_grad=True)
    assert _saved_bytes(lambda: wide(xw), *wide.parameters()) == 8 * xw.nbytes
    hooked = _feed_forward()  # a LoRA hook on a layer: the modules must run
    hooked.net[2].register_forward_hook(lambda m, i, o: o)
    trainable = _feed_forward().requires_grad_(True)  # fine-tuning
    for ff in (hooked, trainable):
        assert _saved_bytes(lambda: ff(x), *ff.parameters()) > x.nbytes


@pytest.mark.parametrize("bias", [True, False])
def test_frozen_projections_between_pixels_and_tokens(bias):
    """A transformer's frozen 1x1 proj_in / proj_out run as one product per image that writes the
    other layout directly: the convolution's numbers up to fp32 summation order, nothing kept."""
    from sdlab.models.layers import pixels_to_tokens, tokens_to_pixels

    torch.manual_seed(0)
    conv = Conv2d(16, 24, 1, bias=bias).requires_grad_(False)
    x = torch.randn(2, 16, 5, 7)
    (tokens, (dx,)), (ref, (ref_dx,)) = _grads(lambda t: pixels_to_tokens(t, conv), x, []), _grads(
        lambda t: F.conv2d(t, conv.weight, conv.bias).flatten(2).transpose(1, 2), x, [])
    torch.testing.assert_close(tokens, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    assert tokens.is_contiguous() and dx.is_contiguous()

    back = Conv2d(24, 16, 1, bias=bias).requires_grad_(False)
    t = torch.randn(2, 35, 24)
    (pixels, (dt,)), (ref, (ref_dt,)) = _grads(
        lambda t: tokens_to_pixels(t, back, (5, 7), torch.contiguous_format), t, []), _grads(
        lambda t: F.conv2d(t.transpose(1, 2).reshape(2, 24, 5, 7), back.weight, back.bias), t, [])
    torch.testing.assert_close(pixels, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dt, ref_dt, rtol=1e-5, atol=1e-5)
    assert pixels.is_contiguous() and dt.is_contiguous()

    xr, tr = x.requires_grad_(), t.requires_grad_()
    assert _saved_bytes(lambda: pixels_to_tokens(xr, conv), *conv.parameters()) == 0
    assert _saved_bytes(lambda: tokens_to_pixels(tr, back, (5, 7), torch.contiguous_format), *back.parameters()) == 0


def test_projections_fall_back_to_the_module_where_the_product_does_not_apply():
    """Hooked (a LoRA on proj_in), trainable, channels-last or gradient-free projections call the
    module itself."""

    conv = Conv2d(16, 24, 1).requires_grad_(False)
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    assert layers._frozen_projection_as_matmul(x, conv)
    assert not layers._frozen_projection_as_matmul(x.detach(), conv)
    assert not layers._frozen_projection_as_matmul(x.contiguous(memory_format=torch.channels_last), conv)
    calls = []
    handle = conv.register_forward_hook(lambda *_: calls.append(1))
    assert not layers._frozen_projection_as_matmul(x, conv)
    layers.pixels_to_tokens(x, conv)
    assert calls == [1]
    handle.remove()
    conv.requires_grad_(True)
    assert not layers._frozen_projection_as_matmul(x, conv)
    assert not layers._frozen_projection_as_matmul(x, Conv2d(16, 24, 3, padding=1).requires_grad_(False))


def test_recomputed_for_backward_keeps_the_recipe_not_the_tensor():
    """A LayerNorm's output read by three trainable Linears (a LoRA on q, k, v): with the norm
    computed again in backward the output is not kept, the norm runs once more (not once per
    reader), and every gradient is bit for bit the same."""
    import weakref

    from sdlab.models.layers import recomputed_for_backward

    torch.manual_seed(0)
    norm, readers = nn.LayerNorm(16), [nn.Linear(16, 4) for _ in range(3)]
    x = torch.randn(2, 5, 16)
    calls = []

    def again():
        calls.append(1)
        return norm(xr)

    def run(recompute: bool):
        h = norm(xr)
        with recomputed_for_backward(h, again) if recompute else contextlib.nullcontext():
            # a view of h is what F.linear keeps for a 3-D input
            out = sum(r(h).square().sum() for r in readers)
        return out, weakref.ref(h)

    grads = []
    for recompute in (False, True):
        xr = x.clone().requires_grad_()
        for p in [*norm.parameters(), *(p for r in readers for p in r.parameters())]:
            p.grad = None
        out, h_ref = run(recompute)
        assert (h_ref() is None) == recompute  # kept only without the recomputation
        out.backward()
        grads.append([xr.grad, *(p.grad for r in readers for p in r.parameters()), norm.weight.grad])
    assert len(calls) == 1
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weights, inputs", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.bfloat16)])
def test_transformer_block_trains_under_autocast_as_without_recomputing(monkeypatch, weights, inputs):
    """Mixed-precision training through a transformer block with trainable weights (fine-tuning,
    fp32 or bf16): backward runs without autocast, yet the LayerNorm outputs it computes again are
    the forward's (dtype and bits), so every gradient equals that of keeping them."""
    from sdlab.models import unet
    from sdlab.models.unet import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 4, 8, 16).to(weights).train()
    x, context = torch.randn(2, 10, 32).to(inputs), torch.randn(2, 5, 16).to(inputs)

    def step():
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            out = block(xr, context)
        out.float().square().mean().backward()
        grads = [xr.grad, *(p.grad for p in block.parameters())]
        block.zero_grad(set_to_none=True)
        return out.detach(), grads

    recomputed = step()
    monkeypatch.setattr(unet, "recomputed_for_backward", lambda t, compute: contextlib.nullcontext())
    kept = step()
    _same(recomputed, kept)
    assert all(g is not None for g in recomputed[1])


def test_recomputed_for_backward_stands_aside_inside_gradient_checkpointing():
    """Saved-tensor hooks do not nest: inside a checkpointed block, ours would take the tensors
    from the checkpoint's and keep them all. There it does nothing; the checkpoint recomputes."""
    from torch.utils.checkpoint import checkpoint


    norm, reader = nn.LayerNorm(8), nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    calls = []

    def block(x):
        assert layers._saved_tensors_hooks_active()
        h = norm(x)
        with layers.recomputed_for_backward(h, lambda: calls.append(1) or norm(x)):
            return reader(h).sum()

    assert not layers._saved_tensors_hooks_active()
    checkpoint(block, x, use_reentrant=False).backward()
    assert calls == [] and x.grad is not None


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_nearest_2x_equals_interpolate(channels_last):
    from sdlab.models.layers import memory_format_of, upsample_nearest_2x

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (out, (dx,)), (ref, (ref_dx,)) = _grads(upsample_nearest_2x, x, []), _grads(
        lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest"), x, [])
    assert torch.equal(out, ref) and memory_format_of(out) == memory_format_of(x)
    assert torch.equal(dx, ref_dx)
