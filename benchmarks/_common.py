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
from collections.abc import Sequence
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
