"""Where the networks run and in which precision: device choice, the CPU's fastest
dtype, thread count, and the `sdlab info --device` text.

Nothing here runs at import; the CLI and the server call `configure_threads()` once
at start-up and `choose_device` / `default_dtype` when they load a model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SdlabError
from .models.layers import cpu_packing_pays, cpu_packing_supported

log = logging.getLogger(__name__)

# Set by the user (or a launcher such as torchrun) to fix the thread count; we never override them.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# CPU flags that mean bf16 matrix maths runs in hardware: AVX512-BF16 (Cooper Lake and later)
# and AMX (Sapphire Rapids and later). Without them bf16 is emulated and slower than fp32.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# The same for fp16 (Sapphire Rapids' AVX512-FP16, Granite Rapids' AMX-FP16); sdlab never picks
# fp16 on a CPU by itself, but a user may ask for it.
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})
# VAEs whose fp16 decode overflows (NaN/inf) on ordinary images, so they start in a wider dtype
# on fp16 devices (diffusers' `force_upcast`). SD 1.x / 2.x VAEs mostly fit fp16 and are guarded
# per call instead (`perf.decode_latents`).
UPCAST_VAE_FAMILIES = ("sdxl", "sdxl-inpaint", "sdxl-refiner")
_CPUINFO = Path("/proc/cpuinfo")


# ---------------------------------------------------------------- the CPU


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (or of `cpuinfo`, a text in its format).

    Empty where the file does not exist (macOS, Windows): callers then fall back to fp32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = _CPUINFO.read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM spelling
            return frozenset(value.split())
    return frozenset()


def best_cpu_dtype(flags: Iterable[str] | None = None) -> torch.dtype:
    """bf16 when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), else fp32.

    Args:
        flags: CPU feature flags; default: read from /proc/cpuinfo.
    """
    flags = cpu_flags() if flags is None else frozenset(flags)
    return torch.bfloat16 if flags & BF16_FLAGS else torch.float32


def emulated_cpu_dtype_warning(dtype: torch.dtype, instead: str = "leave --dtype out to run in fp32",
                               flags: Iterable[str] | None = None) -> str | None:
    """A line for the user who asks for a half-precision dtype the CPU has no hardware for (ending
    with what to do `instead`), or None.

    PyTorch then runs reference kernels: on an AVX2 CPU (2-core AMD EPYC, PyTorch 2.13) a
    4096x320 by 320x320 matrix product takes 48x as long in bf16 as in fp32 (42x in fp16), a
    640-channel 3x3 convolution at 32x32 7x (5.5x).
    """
    hardware = {torch.bfloat16: BF16_FLAGS, torch.float16: FP16_FLAGS}.get(dtype)
    if hardware is None:
        return None
    flags = cpu_flags() if flags is None else frozenset(flags)
    if flags & hardware:
        return None
    return (f"this CPU has no {dtype_name(dtype)} hardware ({' / '.join(sorted(hardware))}): {dtype_name(dtype)} "
            f"runs emulated, many times slower than fp32; {instead}")


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores this process may run on (hyper-threads share one core's FMA units,
    so a second thread per core only adds contention to matrix-bound work)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    if cpuinfo is None:
        try:
            cpuinfo = _CPUINFO.read_text()
        except OSError:
            return allowed
    cores, physical, logical = set(), "0", 0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            logical += 1
        elif key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    if not cores or logical == 0:
        return allowed
    # The affinity mask counts logical CPUs; scale it by the machine's threads per core.
    threads_per_core = max(1, logical // len(cores))
    return max(1, min(len(cores), allowed // threads_per_core))


def configure_threads(env: Mapping[str, str] | None = None, cpuinfo: str | None = None) -> int | None:
    """Use one intra-op thread per physical core unless the user chose a count.

    Call once at start-up (the CLI and server do). Returns the count set, or None when
    OMP_NUM_THREADS / MKL_NUM_THREADS is set and torch's own choice is kept.
    """
    env = os.environ if env is None else env
    if any(env.get(name) for name in THREAD_ENV_VARS):
        return None
    n = physical_cores(cpuinfo)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        log.debug("torch intra-op threads: %d (one per physical core)", n)
    return n


# ---------------------------------------------------------------- the device


def choose_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on: `name` when given ("cpu", "cuda", "cuda:1", "mps"), else CUDA
    when available, else the CPU.

    Raises:
        SdlabError: the named device does not exist on this machine.
    """
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SdlabError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SdlabError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SdlabError(f"device {name!r} asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SdlabError("device 'mps' asked for, but this torch has no Metal support; use --device cpu")
    return device


def default_dtype(device: torch.device, flags: Iterable[str] | None = None) -> torch.dtype:
    """Weight dtype of the UNet and text encoders when the user gives none.

    CUDA and MPS: fp16 (every SD checkpoint is trained to run in it; its VAE is guarded,
    see `vae_dtype`). CPU: `best_cpu_dtype()`.
    """
    if device.type in ("cuda", "mps"):
        return torch.float16
    return best_cpu_dtype(flags)


def default_weight_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the UNet's and text encoders' matrices are kept in when the user names neither
    dtype, for networks computing in `dtype` (see `models.storage`).

    fp16 on a CPU computing in fp32: half the memory (an SD 1.5 UNet 1.7 instead of 3.4 GB)
    for about 1% more time per step, and the same numbers as an fp16 checkpoint gives, which
    is what most downloads are. Elsewhere the compute dtype itself.
    """
    if device.type == "cpu" and dtype == torch.float32:
        return torch.float16
    return dtype


def vae_dtype(device: torch.device, dtype: torch.dtype, family: str | None = None) -> torch.dtype:
    """The VAE's dtype when the UNet runs in `dtype` on `device`.

    CPU: fp32, as the pipeline runs it: the VAE runs once per image (about a sixth of a
    20-step 512x512 image on a bf16 CPU), and fp32 keeps its pixels as the reference gives
    them. GPU: the UNet's dtype, except fp16 for the SDXL VAEs, which overflow there: bf16
    where the GPU has it, else fp32.
    """
    if device.type == "cpu":
        return torch.float32
    if dtype == torch.float16 and family in UPCAST_VAE_FAMILIES:
        return wider_than_fp16(device)
    return dtype


def wider_than_fp16(device: torch.device) -> torch.dtype:
    """What a VAE that overflows fp16 runs in instead: bf16 on GPUs that have it, else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def packs_cpu_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the denoiser's weights (UNet convolutions, MMDiT linear layers) are kept
    pre-packed for oneDNN by default (`perf.prepare_for_inference`): on CPUs where that is faster
    (`layers.cpu_packing_pays`)."""
    return device.type == "cpu" and cpu_packing_pays(dtype)


@dataclass(frozen=True)
class Defaults:
    """What sdlab runs with on a device when the user names no dtype: every choice that differs
    from one CPU to another (and between a CPU and a GPU), in one place. `sdlab info --device`
    prints it; tests force each value rather than relying on the machine's."""

    dtype: torch.dtype  # the UNet's and text encoders' compute dtype (`default_dtype`)
    weight_dtype: torch.dtype  # their matrices' storage dtype (`default_weight_dtype`)
    vae_dtype: torch.dtype  # the VAE's (`vae_dtype`; SDXL's differs on fp16 GPUs)
    pack_weights: bool  # denoiser weights pre-packed for oneDNN (`packs_cpu_weights`)


def defaults(device: torch.device, flags: Iterable[str] | None = None) -> Defaults:
    """The `Defaults` on `device` (CPU feature `flags`: default read from /proc/cpuinfo)."""
    dtype = default_dtype(device, flags)
    return Defaults(dtype, default_weight_dtype(device, dtype), vae_dtype(device, dtype),
                    packs_cpu_weights(device, dtype))


def available_memory(device: torch.device) -> int:
    """Bytes that a new allocation on `device` can take.

    CUDA: free device memory plus what torch's caching allocator holds unused. CPU:
    MemAvailable from /proc/meminfo, capped by the cgroup (container) limit when one is
    set; elsewhere the free physical pages.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    available = _meminfo_available()
    limit = _cgroup_free()
    return min(available, limit) if limit is not None else available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # unknown platform: assume a modest machine


def _cgroup_free() -> int | None:
    """Bytes left under a cgroup v2 memory limit, or None when there is none."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        return None


def reuse_freed_memory(trim_threshold: int = 512 * 2**20) -> bool:
    """Let glibc keep large freed blocks for reuse instead of unmapping them; returns whether
    it could (glibc only). Process-wide: the trainer calls it, a library caller may too.

    glibc serves every allocation of 32 MB or more with a fresh mmap and unmaps it on free. A
    CPU training step makes such allocations by the dozen (oneDNN's reordered copy of each large
    convolution weight, in forward and backward), and the kernel then zeroes their pages one
    fault at a time on first touch: about 2 GB of page faults per SD 1.5 LoRA step at 512 px,
    6% of its time (2-core CPU, steps alternated in one process). From the heap instead, a step
    reuses what the previous one freed: no faults after the first steps and about the same
    high-water mark (5.57 vs 5.49 GiB over 12 steps). Not for inference: there the larger,
    fewer buffers fragment the heap (txt2img peak 4.5 vs 3.8 GB) and the gain is small.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    # mallopt returns 1 on success.
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))


def return_freed_memory() -> None:
    """Hand heap memory that Python and PyTorch have freed back to the OS (glibc's malloc_trim).

    Casting or repacking weights frees one large buffer per tensor; glibc keeps such freed
    blocks in its heap for reuse, so without this the process holds (and is charged for) a
    few hundred MB it no longer uses. A no-op where the C library is not glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


# What `--dtype` (CLI, server) accepts: the short names and torch's own.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# What `--weight-dtype` accepts besides DTYPES: the fp8 formats, for storage only.
WEIGHT_DTYPES = {**DTYPES, "fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn,
                 "float8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "float8_e5m2": torch.float8_e5m2}


def parse_dtype(name: str | None, names: dict[str, torch.dtype] = DTYPES, what: str = "dtype") -> torch.dtype | None:
    """The dtype a user named ("fp16", "bfloat16", ...) among `names`, or None for none named.

    Raises:
        SdlabError: a name that is not one of them.
    """
    if name is None:
        return None
    try:
        return names[name.lower()]
    except KeyError:
        choices = ", ".join(dict.fromkeys(dtype_name(d) for d in names.values()))
        raise SdlabError(f"unknown {what} {name!r}; choose one of {choices}") from None


def parse_weight_dtype(name: str | None) -> torch.dtype | None:
    """The storage dtype a user named for `--weight-dtype` (fp32, fp16, bf16, fp8_e4m3fn,
    fp8_e5m2), or None for none named."""
    return parse_dtype(name, WEIGHT_DTYPES, "weight dtype")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_e4m3fn",
            torch.float8_e5m2: "fp8_e5m2"}.get(dtype, str(dtype))


def describe(device: torch.device | None = None) -> str:
    """Several lines for `sdlab info --device`: the device, what the CPU offers and the
    dtypes sdlab would choose."""
    device = choose_device(device)
    flags = cpu_flags()
    chosen = defaults(device, flags)
    dtype = chosen.dtype
    rows = [("device", str(device)), ("torch", torch.__version__)]
    cpu_name = _cpu_model()
    if cpu_name:
        rows.append(("CPU", cpu_name))
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    rows.append(("CPU features", " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"))
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    rows.append(("CPU kernels", f"{capability}, oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}"))
    chosen_by = [v for v in THREAD_ENV_VARS if os.environ.get(v)]
    rows.append(("threads", f"{torch.get_num_threads()} of {physical_cores()} physical cores"
                 + (f" (set by {', '.join(chosen_by)})" if chosen_by else "")))
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        rows.append(("GPU", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute {props.major}.{props.minor}"))
        rows.append(("GPU bf16", "yes" if torch.cuda.is_bf16_supported() else "no"))
    why = ""
    if device.type == "cpu":
        why = " (CPU has AVX512-BF16/AMX)" if dtype == torch.bfloat16 else " (no bf16 in hardware)"
    rows.append(("UNet / text encoder dtype", dtype_name(dtype) + why))
    weights = chosen.weight_dtype
    if weights != dtype:
        rows.append(("UNet / text encoder weights", f"stored as {dtype_name(weights)}, upcast layer by layer "
                     f"(--weight-dtype {dtype_name(dtype)} keeps them in {dtype_name(dtype)})"))
    rows.append(("VAE dtype", dtype_name(chosen.vae_dtype)))
    if device.type == "cpu":
        if chosen.pack_weights:
            packing = "pre-packed for oneDNN"
        elif cpu_packing_supported(dtype):
            packing = "plain, convolutions channels-last (oneDNN's pre-packed weights are slower without AVX-512)"
        else:
            packing = "plain, convolutions channels-last (no oneDNN packing in this build)"
        rows.append(("denoiser weights", packing))
    else:
        rows.append(("denoiser weights", "plain (convolutions channels-last)"))
    rows.append(("attention", "torch scaled_dot_product_attention"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _cpu_model() -> str:
    try:
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return ""
