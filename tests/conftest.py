"""Fixtures for every test: the CPU kinds whose defaults differ (`device.defaults`).

sdlab chooses its dtypes and weight layout from the CPU it runs on: fp32 compute with fp16
weight storage on an AVX2-only CPU, bf16 compute with convolution weights pre-packed for oneDNN
on one with AVX512-BF16 or AMX. A test of such a default path takes the `cpu_defaults` fixture,
parametrised indirectly, so that it runs each kind on every machine rather than the machine's:

    @pytest.mark.parametrize("cpu_defaults", CPU_KINDS, indirect=True)
    def test_default_path(cpu_defaults): ...

bf16 runs on an AVX2 CPU too (emulated, slowly); only packed bf16 convolutions need oneDNN's
bf16 kernels, so there the bf16 kind computes in bf16 with plain weights.

`SDLAB_TEST_CPU_FLAGS="avx2 fma"` makes the whole session see those CPU flags in place of
/proc/cpuinfo's; with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (which PyTorch and oneDNN
read themselves) an AVX-512 machine then runs the suite as an AVX2-only CPU would, in this process.
"""

from __future__ import annotations

import os

import pytest
import torch

from sdlab import device as devices

# Flags and PyTorch's kernel level of each kind of CPU this project runs on.
CPU_KINDS_FLAGS = {
    "avx2": (frozenset({"avx2", "fma"}), "AVX2"),  # AMD EPYC before Zen 4, older Xeons
    "avx512-bf16": (frozenset({"avx2", "fma", "avx512f", "avx512_bf16"}), "AVX512"),  # Zen 4, Cooper Lake
    "amx": (frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), "AVX512"),  # Sapphire Rapids
}
CPU_KINDS = ["avx2", "amx"]  # the two whose defaults differ (avx512-bf16 has amx's)


def _pretend(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], capability: str) -> None:
    real = devices.cpu_flags

    def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
        return flags if cpuinfo is None else real(cpuinfo)

    monkeypatch.setattr(devices, "cpu_flags", cpu_flags)
    # What sdlab reads to decide on packing (`layers.cpu_packing_pays`); the kernels PyTorch runs
    # stay the machine's.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@pytest.fixture
def cpu_defaults(request, monkeypatch) -> devices.Defaults:
    """The CPU defaults of the kind named by the parameter (see the module docstring), in force
    for the test; returns them."""
    flags, capability = CPU_KINDS_FLAGS[request.param]
    _pretend(monkeypatch, flags, capability)
    return devices.defaults(torch.device("cpu"))


@pytest.fixture(autouse=True, scope="session")
def _session_cpu_flags():
    flags = os.environ.get("SDLAB_TEST_CPU_FLAGS")
    if not flags:
        yield
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        capability = "AVX512" if "avx512f" in flags.split() else "AVX2"
        _pretend(monkeypatch, frozenset(flags.split()), capability)
        yield


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    """The tiny random SD3 diffusers folder of tests/test_sd3.py (`tiny_sd3_folder`, seed 0), written
    once for the SD3 test files that only read it (API, inpainting, memory)."""
    from tests.test_sd3 import tiny_sd3_folder

    return tiny_sd3_folder(tmp_path_factory.mktemp("sd3-shared") / "tiny-sd3")
