"""Weights stored in a narrower dtype than the one they compute in (ComfyUI's "manual cast",
the web UI's "FP8 weight").

A network whose matrices are kept as fp16 (or bf16, fp8) and upcast one layer at a time
just before that layer runs needs about half (a quarter) of the memory for its weights, and
computes exactly what the same network with fp32 weights rounded to fp16 computes: the
upcast is exact, the kernels and layouts are the same.

- On a CPU without bf16 arithmetic the UNet computes in fp32; keeping its weights in fp16
  takes an SD 1.5 UNet from 3.4 to 1.7 GB. An fp16 checkpoint (most downloads) loses nothing
  at all; an fp32 one is rounded once, as every fp16 download was.
- On a GPU, fp8 weights with fp16 / bf16 arithmetic let SDXL fit on small cards.

What is stored narrow: the >= 2-D weights a module reads in its own `forward` (Linear and
convolution weights, OpenCLIP's fused `in_proj_weight`): nearly all of a network's bytes; and,
in fp16 or bf16, the embedding tables (a text encoder's token table: 152 MB of SD 1.5's CLIP in
fp32, 253 MB of SDXL's bigG). An embedding gathers its rows from the narrow table and upcasts
only those. With fp8 the tables stay in the compute dtype, as kohya's fp8_base and the web UI's
FP8 weight keep them. Norms and biases stay in the compute dtype.

Each module that owns narrow weights gets a `forward` that, for the length of the call, swaps
those parameters for compute-dtype copies written into one scratch buffer per network (the
"arena"), then puts the stored ones back. Fresh allocations instead would cost a page fault per 4 KB
on every call (the kernel zeroes new pages): 1.3 s per SD 1.5 step on a 2-core CPU, against
0.2 s for copying into reused memory. At rest, everything that reads parameters (state_dict,
LoRA merging, `.to(device)`) sees the narrow tensors.

Inference only: with autograd on, each call gets fresh copies (a kernel may keep its weight
for backward), and narrow weights get no gradient.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlab.models.layers import unpack_weights

# Narrower than every compute dtype they are used with.
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def narrowable(net: nn.Module, weights: torch.dtype | None = None) -> dict[str, tuple[nn.Module, str]]:
    """The parameters `set_dtypes` may store as `weights` (default: as any narrow dtype):
    {full name: (owning module, attribute)}. Embedding tables only for 16-bit dtypes."""
    tables = weights is None or torch.finfo(weights).bits == 16
    out = {}
    for path, module in net.named_modules():
        if module is net:
            continue  # a root's own tables (OpenCLIP's positions, projection) are read outside forward
        if isinstance(module, nn.Embedding):
            if tables and module.max_norm is None:  # max_norm would write to the table
                out[f"{path}.weight"] = (module, "weight")
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.ndim >= 2 and p.is_floating_point():
                out[f"{path}.{name}"] = (module, name)
    return out


def set_dtypes(net: nn.Module, compute: torch.dtype, weights: torch.dtype | None = None) -> nn.Module:
    """Make `net` compute in `compute` with its narrowable weights stored as `weights`
    (default: `compute`, i.e. nothing stored narrow); changes `net` in place and returns it.

    Idempotent, and it undoes an earlier call: each tensor is cast only when its dtype differs,
    one at a time, so memory never holds two copies of the network. A weight that would
    overflow the narrow dtype (|w| > 65504 for fp16, 448 for fp8_e4m3fn) stays in `compute`.
    """
    weights = weights or compute
    if weights != compute and weights not in STORAGE_DTYPES:
        raise ValueError(f"weights can be stored as {', '.join(map(str, STORAGE_DTYPES))}, not {weights}")
    _unwrap(net)
    # A weight packed for oneDNN (`layers.Conv2d` / `layers.Linear` `.pack_for_cpu`) has no dtype cast of its own:
    # every change below starts from the plain layout.
    unpack_weights(net)
    narrow = narrowable(net, weights) if weights != compute else {}
    trainable = [name for name in narrow if net.get_parameter(name).requires_grad]
    if trainable:
        raise ValueError(f"weights stored narrow are for inference; {trainable[0]} requires grad")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.is_floating_point():
                p.data = narrowed(p.data, weights, compute) if name in narrow else p.data.to(compute)
        for module in net.modules():
            for name, b in module.named_buffers(recurse=False):
                if b.is_floating_point() and b.dtype != compute:
                    setattr(module, name, b.to(compute))
    owners: dict[nn.Module, list[str]] = {}
    for module, attr in narrow.values():
        if getattr(module, attr).dtype == compute:
            continue
        if isinstance(module, nn.Embedding):
            module.forward = _GatherForward(module, compute)
        else:
            owners.setdefault(module, []).append(attr)
    if owners:
        arena = _Arena(compute, _stack_need(net, owners))
        for module, attrs in owners.items():
            module.forward = _UpcastForward(module, attrs, arena)
    net.sdlab_compute_dtype = compute
    return net


def narrowed(t: Tensor, narrow: torch.dtype, compute: torch.dtype) -> Tensor:
    """`t` in the `narrow` dtype, or in `compute` where it would overflow `narrow`."""
    if t.dtype == narrow:
        return t
    if t.numel() and t.abs().amax() > torch.finfo(narrow).max:
        return t.to(compute)  # out of the narrow range: keep it wide rather than store inf / NaN
    return t.to(narrow)


def compute_dtype(net: nn.Module) -> torch.dtype:
    """The dtype `net` computes in: its parameters' dtype unless `set_dtypes` stored weights
    narrower."""
    dtype = getattr(net, "sdlab_compute_dtype", None)
    return dtype if dtype is not None else next(net.parameters()).dtype


def storage_dtype(net: nn.Module) -> torch.dtype:
    """The narrowest dtype among `net`'s narrowable weights (its compute dtype when none is)."""
    compute = compute_dtype(net)
    dtypes = {getattr(m, a).dtype for m, a in narrowable(net).values()} - {compute}
    return min(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else compute


def stores_narrow(net: nn.Module) -> bool:
    return any(isinstance(m.__dict__.get("forward"), (_UpcastForward, _GatherForward)) for m in net.modules())


def _unwrap(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module.__dict__.get("forward"), (_UpcastForward, _GatherForward)):
            del module.forward  # back to the class's forward
    net.__dict__.pop("sdlab_compute_dtype", None)


class _Arena:
    """Per network: one compute-dtype buffer per device, handed out as a stack (an OpenCLIP
    attention leases its fused weight, then its `out_proj` leases on top). A lock makes a
    network safe to call from several threads: they take turns, layer by layer."""

    def __init__(self, dtype: torch.dtype, size: int):
        self.dtype, self.size = dtype, size
        self.buffers: dict[torch.device, Tensor] = {}
        self.top = 0
        self.lock = threading.RLock()

    @contextmanager
    def lease(self, module: nn.Module, attrs: list[str]) -> Iterator[None]:
        """For the `with` block, `module`'s parameters `attrs` are stand-ins in the compute dtype.
        Stand-ins, not new `.data` for the stored parameters: a tensor autograd saved for
        backward must keep its values after the block."""
        with self.lock:
            stored = {a: module._parameters[a] for a in attrs}  # under the lock: another thread may hold stand-ins
            top = self.top
            try:
                for a, p in stored.items():
                    module._parameters[a] = nn.Parameter(self._take(p), requires_grad=False)
                yield
            finally:
                module._parameters.update(stored)
                self.top = top

    def _take(self, narrow: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return narrow.detach().to(self.dtype)  # autograd may keep it: never reuse its memory
        buffer = self.buffers.get(narrow.device)
        if buffer is None:
            with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
                buffer = torch.empty(self.size, dtype=self.dtype, device=narrow.device)
            self.buffers[narrow.device] = buffer
        # The same strides as the stored weight (channels-last stays channels-last).
        out = buffer.as_strided(narrow.shape, narrow.stride(), self.top)
        self.top += narrow.numel()
        return out.copy_(narrow)


def _stack_need(module: nn.Module, owners: dict[nn.Module, list[str]]) -> int:
    """Elements the arena needs under `module`: the largest sum of weights leased at once, along
    a chain of nested owners."""
    own = sum(getattr(module, a).numel() for a in owners.get(module, ()))
    return own + max((_stack_need(c, owners) for c in module.children()), default=0)


class _UpcastForward:
    """A module's `forward` with its narrow weights upcast for the call."""

    def __init__(self, module: nn.Module, attrs: list[str], arena: _Arena):
        self.forward = type(module).forward.__get__(module)
        self.module, self.attrs, self.arena = module, attrs, arena

    def __call__(self, *args, **kwargs):
        with self.arena.lease(self.module, self.attrs):
            return self.forward(*args, **kwargs)


class _GatherForward:
    """An embedding's `forward` that gathers rows from its narrow table and upcasts only them:
    the same numbers as upcasting the table first."""

    def __init__(self, module: nn.Embedding, compute: torch.dtype):
        self.module, self.compute = module, compute

    def __call__(self, ids: Tensor) -> Tensor:
        m = self.module
        return F.embedding(ids, m.weight, m.padding_idx, None, 2.0, m.scale_grad_by_freq, m.sparse).to(self.compute)
