"""Helpers shared by the hand-run benchmarks (not collected by pytest).

Each measurement runs in a fresh child process (`run_child`), so peak memory and
import costs belong to one loader only and nothing is left warm by an earlier one.
The child reports one JSON line (`emit`) that the parent reads back.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

RESULT_MARK = "BENCH-RESULT "


# ---------------------------------------------------------------- in the child


def memory() -> dict[str, int]:
    """The process's resident memory now, in bytes: total (VmRSS), its high-water mark
    (VmHWM), and the anonymous / file-backed parts. File-backed pages are memory-mapped
    weights that the kernel can drop and re-read; anonymous pages are real copies."""
    names = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in names:
                    out[names[key]] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: only the lifetime peak is known
        out["peak"] = peak_rss()
    return out


def reset_peak_rss() -> bool:
    """Restart the VmHWM high-water mark from the current RSS (Linux >= 4.0), so a later
    `memory()["peak"]` covers only what came after. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Lifetime peak RSS of this process in bytes (interpreter and imports included)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def emit(result: dict) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


class Stopwatch:
    """Seconds since construction, for phases measured inside one child."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.t0 = now - self.t0, now
        return elapsed


def write_safetensors_streamed(path: Path, specs: Mapping[str, tuple[tuple[int, ...], object]],
                               tensor_for: Callable[[str], object]) -> None:
    """Write a .safetensors file one tensor at a time: `specs` maps each key to its
    (shape, torch dtype), and `tensor_for(key)` makes that tensor just before it is written.
    `safetensors.torch.save_file` needs every tensor in memory at once (and may copy each to
    bytes); a full-size SDXL file is ~6.9 GB in fp16, so this keeps the writer's memory to
    one tensor. No `__metadata__`: like a file downloaded from elsewhere."""
    import torch

    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
    header, offset = {}, 0
    for key, (shape, dtype) in specs.items():
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, (shape, dtype) in specs.items():
            t = tensor_for(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{key}: made {tuple(t.shape)} {t.dtype}, declared {tuple(shape)} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy for a contiguous tensor
        if f.tell() != 8 + len(raw) + offset:
            raise ValueError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(raw) + offset}")


# ---------------------------------------------------------------- in the parent


def run_child(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run `python ARGS` in a fresh process and return the dict it emitted."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
    raise RuntimeError(f"child {' '.join(args)} exited {proc.returncode} without a result:\n{tail}")


def warm_page_cache(path: Path, chunk: int = 1 << 24) -> float:
    """Read a file once so every loader starts from the same (warm) page cache; returns seconds."""
    watch = Stopwatch()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass
    return watch.lap()


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float) -> str:
    return f"{s:.2f} s"


def fmt_ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "n/a"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> None:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    if title:
        print(title)
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
