"""Speed and memory paths: dtype and thread choice, tiled VAE (seam test), channels-last,
GroupNorm in half precision, the fp16 VAE guard, offload hooks, and the accuracy of the
default CPU path (bf16) against fp32 through the whole pipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlab import device as devices
from sdlab import perf
from sdlab.checkpoints.loader import load_bundle
from sdlab.errors import SdlabError
from sdlab.models.layers import GroupNorm32, cpu_packing_pays, cpu_packing_supported
from sdlab.models.vae import AutoencoderKL, VAEConfig, should_tile
from sdlab.pipeline import GenerationRequest, Pipeline

from .conftest import CPU_KINDS
from .tiny import TINY_VAE, as_float_array, psnr, save_native, tiny_bundle

CPUINFO = """processor\t: 0
model name\t: Some CPU
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse avx2 avx512f {extra}

processor\t: 1
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse avx2 avx512f {extra}

processor\t: 2
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse avx2 avx512f {extra}

processor\t: 3
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse avx2 avx512f {extra}
"""


# ---------------------------------------------------------------- device choice


@pytest.mark.parametrize("extra, expected", [("", torch.float32), ("avx512_bf16", torch.bfloat16),
                                             ("amx_tile amx_bf16", torch.bfloat16), ("avx512_fp16", torch.float32)])
def test_best_cpu_dtype_from_flags(extra, expected):
    flags = devices.cpu_flags(CPUINFO.format(extra=extra))
    assert "avx512f" in flags
    assert devices.best_cpu_dtype(flags) == expected
    assert devices.default_dtype(torch.device("cpu"), flags) == expected


def test_half_precision_without_cpu_hardware_gets_a_warning(monkeypatch, caplog, tmp_path):
    avx2, bf16_cpu = ["avx2", "fma"], ["avx2", "avx512f", "avx512_bf16"]
    warning = devices.emulated_cpu_dtype_warning
    assert "bf16 runs emulated" in warning(torch.bfloat16, flags=avx2)
    assert "fp16 runs emulated" in warning(torch.float16, flags=bf16_cpu)
    assert warning(torch.bfloat16, flags=bf16_cpu) is None
    assert warning(torch.float16, flags=["amx_fp16"]) is None
    assert warning(torch.float32, flags=avx2) is None
    # what `sdlab.load` / the CLI says when a user asks for it on such a CPU
    monkeypatch.setattr(devices, "cpu_flags", lambda cpuinfo=None: frozenset(avx2))
    path = save_native(tiny_bundle("sd1"), tmp_path / "tiny.safetensors")
    with caplog.at_level(logging.WARNING, logger="sdlab.perf"):
        perf.load_for_inference(path, "cpu", torch.bfloat16)
    assert "leave --dtype out to run in fp32" in caplog.text


def test_dtype_names_as_users_write_them():
    assert [devices.parse_dtype(n) for n in ("fp32", "Float16", "BF16", "bfloat16", None)] == [
        torch.float32, torch.float16, torch.bfloat16, torch.bfloat16, None]
    with pytest.raises(SdlabError, match="unknown dtype 'half'; choose one of fp32, fp16, bf16"):
        devices.parse_dtype("half")


def test_default_dtype_on_gpu_is_fp16_and_no_flags_means_fp32():
    assert devices.default_dtype(torch.device("cuda")) == torch.float16
    assert devices.best_cpu_dtype([]) == torch.float32
    assert devices.cpu_flags("no flags line here") == frozenset()


def test_physical_cores_counts_cores_not_hyperthreads():
    # 4 logical CPUs, 2 cores; the affinity mask may hold fewer CPUs than the machine.
    n = devices.physical_cores(CPUINFO.format(extra=""))
    assert 1 <= n <= 2


def test_configure_threads_respects_the_users_choice():
    before = torch.get_num_threads()
    try:
        assert devices.configure_threads({"OMP_NUM_THREADS": "3"}) is None
        assert torch.get_num_threads() == before
        n = devices.configure_threads({}, CPUINFO.format(extra=""))
        assert n == torch.get_num_threads() == devices.physical_cores(CPUINFO.format(extra=""))
    finally:
        torch.set_num_threads(before)


def test_vae_dtype_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.vae_dtype(cpu, torch.bfloat16) == torch.float32
    assert devices.vae_dtype(cuda, torch.float16, "sd1") == torch.float16  # guarded per call instead
    assert devices.vae_dtype(cuda, torch.bfloat16, "sdxl") == torch.bfloat16
    assert devices.vae_dtype(cuda, torch.float16, "sdxl") in (torch.bfloat16, torch.float32)


def test_describe_names_device_and_dtypes():
    text = devices.describe(torch.device("cpu"))
    assert "UNet / text encoder dtype" in text and "VAE dtype" in text and "threads" in text


def test_available_memory_and_should_tile():
    free = devices.available_memory(torch.device("cpu"))
    assert free > 0
    assert not should_tile(512, 512, 8 << 30)
    assert should_tile(4096, 4096, 8 << 30)
    assert should_tile(2048, 2048, 8 << 30, batch=2)
    assert not should_tile(1024, 1024, 8 << 30, element_size=2)


# ---------------------------------------------------------------- tiled VAE


def _tiny_vae(cfg: VAEConfig = TINY_VAE, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # GroupNorm affine off the identity, so a wrong statistic would show
        for m in vae.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return vae


def _latents(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.randn(b, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    return 2 * smooth + 0.3 * torch.randn(b, 4, h, w, generator=g)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Decoder output as the pipeline turns it into pixels: [-1, 1] -> [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tiled_decode_is_seamless(channels_last):
    """Seam test: tiled and untiled decode of the same latents (non-square, many bands)."""
    vae = _tiny_vae()
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    z = _latents(2, 20, 16)
    with torch.no_grad():
        full = vae.decode(z)
        tiled = vae.decode_tiled(z, tile=24)  # bands of ~576 output pixels: 9 rows of 64
    assert tiled.shape == full.shape and tiled.dtype == full.dtype
    diff = (_unit(tiled) - _unit(full)).abs().max().item()
    assert diff < 0.02  # the bound; in fp32 the two are equal up to rounding:
    assert diff < 1e-4, diff


def test_tiled_decode_with_bf16_maps_stays_close():
    vae = _tiny_vae()
    z = _latents(1, 16, 16)
    with torch.no_grad():
        full = _unit(vae.decode(z))
        tiled = _unit(vae.decode_tiled(z, tile=16, store_dtype=torch.bfloat16))
    assert (tiled - full).abs().mean().item() < 2e-3
    assert (tiled - full).abs().max().item() < 0.05


def test_tiled_encode_matches_encode():
    vae = _tiny_vae()
    with torch.no_grad():
        images = vae.decode(_latents(2, 16, 12)).clamp(-1, 1)  # 64 x 48 pixels
        full = vae.encode(images)
        tiled = vae.encode_tiled(images, tile=24)
    assert tiled.mean.shape == full.mean.shape == (2, 4, 16, 12)
    assert (tiled.mean - full.mean).abs().max().item() < 1e-4
    assert (tiled.logvar - full.logvar).abs().max().item() < 1e-4


def test_decode_latents_picks_tiling_and_keeps_the_device():
    vae = _tiny_vae()
    z = _latents(1, 16, 16)
    with torch.no_grad():
        plain = perf.decode_latents(vae, z, tile=False)
        tiled = perf.decode_latents(vae, z, tile=True)
        auto = perf.decode_latents(vae, z)
        bands = vae.decode_tiled(z, tile=perf.CPU_BAND_TILE)
        image = plain.clamp(-1, 1)
        dist = perf.encode_images(vae, image, tile=True)
        whole, auto_dist = perf.encode_images(vae, image, tile=False), perf.encode_images(vae, image)
        bands_dist = vae.encode_tiled(image, tile=perf.CPU_BAND_TILE)
    # 64x64 is small, but the CPU decodes and encodes band by band at every size (less memory, no slower)
    assert torch.equal(auto, bands) and not perf.auto_tile(vae, 64, 64)
    assert (plain - tiled).abs().max().item() < 1e-4 and (plain - auto).abs().max().item() < 1e-4
    assert dist.mean.shape == (1, 4, 16, 16)
    assert torch.equal(auto_dist.mean, bands_dist.mean) and torch.equal(auto_dist.logvar, bands_dist.logvar)
    assert (auto_dist.mean - whole.mean).abs().max().item() < 1e-4


def test_fp16_vae_overflow_is_redone_in_a_wider_dtype():
    vae = _tiny_vae()
    with torch.no_grad():  # activations past fp16's 65504 inside the decoder; fine in fp32
        vae.decoder.conv_in.weight.mul_(3e4)
        vae.decoder.conv_in.bias.mul_(3e4)
    vae.half()
    z = _latents(1, 8, 8).half()
    with torch.no_grad():
        assert not torch.isfinite(vae.decode(z)).all()
        out = perf.decode_latents(vae, z, tile=False)
    assert torch.isfinite(out).all()
    assert next(vae.parameters()).dtype != torch.float16  # stays upcast for the next image


# ---------------------------------------------------------------- layout and precision


def test_channels_last_gives_the_same_outputs():
    bundle = tiny_bundle("sd1")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 64, generator=g)
    t = torch.tensor([10.0, 500.0])
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref_eps, ref_img = bundle.unet(x, t, ctx), bundle.vae.decode(z)
        perf.prepare_for_inference(bundle, "cpu", torch.float32, channels_last=True, pack_weights=False)
        assert bundle.unet.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
        eps, img = bundle.unet(x, t, ctx), bundle.vae.decode(z)
    assert (eps - ref_eps).abs().max().item() < 1e-5
    assert (img - ref_img).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_unet_gives_the_same_outputs(dtype):
    """prepare_for_inference packs the UNet's convolution weights on the CPU: the same outputs as
    the plain channels-last UNet, bit for bit, and the same state dict."""
    if not cpu_packing_supported(dtype):
        pytest.skip(f"this PyTorch build or CPU has no oneDNN {dtype} convolutions")
    plain, packed = tiny_bundle("sd1"), tiny_bundle("sd1")
    perf.prepare_for_inference(plain, "cpu", dtype, pack_weights=False)
    perf.prepare_for_inference(packed, "cpu", dtype, pack_weights=True)
    convs = [m for m in packed.unet.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.weight.is_mkldnn for m in convs) >= len(convs) - 2  # all but conv_in / out (4 channels)
    assert not any(p.is_mkldnn for p in packed.vae.parameters())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.randn(2, 5, 64, generator=g).to(dtype)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        assert torch.equal(packed.unet(x, t, ctx), plain.unet(x, t, ctx))
    ours, ref = packed.unet.state_dict(), plain.unet.state_dict()
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    # Preparing again (another dtype) starts from the plain weights.
    perf.prepare_for_inference(packed, "cpu", torch.float32, pack_weights=False)
    assert not any(p.is_mkldnn for p in packed.unet.parameters())


@pytest.mark.parametrize("packed_in", [torch.float32, torch.bfloat16], ids=["packed-fp32", "packed-bf16"])
@pytest.mark.parametrize("dtype, weights, pack", [(torch.float32, torch.float32, False),
                                                  (torch.float32, torch.float16, None),
                                                  (torch.bfloat16, torch.bfloat16, None),
                                                  (torch.float32, torch.float32, True)],
                         ids=["fp32", "fp32-fp16-weights", "bf16", "fp32-packed"])
def test_a_packed_unet_prepared_again_is_the_freshly_prepared_one(packed_in, dtype, weights, pack):
    """A model loaded with packed convolution weights (the default of a bf16 CPU), then asked for
    other dtypes (the server's options, `sdlab.load` twice, a refiner): each change starts from
    the plain weights, and the UNet is the one prepared that way from the start, bit for bit."""
    if not cpu_packing_supported(packed_in) or (pack and not cpu_packing_supported(dtype)):
        pytest.skip(f"this PyTorch build or CPU has no oneDNN {packed_in} convolutions")
    again, fresh = tiny_bundle("sd1"), tiny_bundle("sd1")
    with torch.no_grad():  # the numbers `again` keeps after its first preparation
        for t in (*fresh.unet.parameters(), *fresh.unet.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(packed_in))
    perf.prepare_for_inference(again, "cpu", packed_in, pack_weights=True)
    assert any(p.is_mkldnn for p in again.unet.parameters())
    perf.prepare_for_inference(again, "cpu", dtype, pack_weights=pack, weight_dtype=weights)
    perf.prepare_for_inference(fresh, "cpu", dtype, pack_weights=pack, weight_dtype=weights)
    ours, ref = again.unet.state_dict(), fresh.unet.state_dict()
    assert all(ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]) for k in ref)
    assert [p.is_mkldnn for p in again.unet.parameters()] == [p.is_mkldnn for p in fresh.unet.parameters()]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.randn(2, 5, 64, generator=g).to(dtype)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        assert torch.equal(again.unet(x, t, ctx), fresh.unet(x, t, ctx))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_groupnorm32_native_half_equals_the_upcast(dtype):
    norm = GroupNorm32(8, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 12, 12) * 5 + 3).to(dtype)
    upcast = F.group_norm(x.float(), 8, norm.weight, norm.bias, 1e-6).to(dtype)
    native = norm.to(dtype)(x)
    assert native.dtype == dtype
    # Same fp32 statistics; at most one rounding step apart.
    assert (native.float() - upcast.float()).abs().max().item() <= 2 * torch.finfo(dtype).eps * upcast.abs().max().item()


@pytest.mark.parametrize("cpu_defaults", CPU_KINDS, indirect=True)
def test_default_cpu_path_stays_close_to_fp32(tmp_path, cpu_defaults):
    """The default CPU paths of both kinds of CPU (bf16 UNet and text encoder with packed
    convolution weights where the CPU has bf16 hardware; else fp32 with their matrices stored as
    fp16), fp32 VAE, channels-last, against fp32, on a tiny random model's decoded images from an
    fp32 file: PSNR >= 30 dB."""
    path = save_native(tiny_bundle("sd1"), tmp_path / "tiny.safetensors")
    req = dict(prompt="a red circle on a blue background", negative_prompt="blurry", steps=12, sampler="Euler",
               cfg_scale=7.0, seed=3, width=64, height=64, batch_size=2)
    ref = Pipeline(load_bundle(path, device="cpu", dtype=torch.float32)).generate(GenerationRequest(**req)).images
    fast = perf.load_for_inference(path, "cpu")
    assert fast.unet.time_embed[0].weight.dtype == cpu_defaults.weight_dtype and fast.dtype == cpu_defaults.dtype
    assert next(fast.vae.parameters()).dtype == cpu_defaults.vae_dtype == torch.float32
    conv = fast.unet.input_blocks[1][0].in_layers[2].weight
    assert conv.is_mkldnn == cpu_defaults.pack_weights
    out = Pipeline(fast).generate(GenerationRequest(**req)).images
    psnrs = [psnr(a, b) for a, b in zip(ref, out)]
    print(f"tiny random model, {devices.dtype_name(cpu_defaults.dtype)} compute, "
          f"{devices.dtype_name(cpu_defaults.weight_dtype)} weights{', packed' if conv.is_mkldnn else ''} vs fp32: "
          "PSNR " + ", ".join(f"{p:.1f}" for p in psnrs) + " dB")
    assert min(psnrs) >= 30, psnrs


@pytest.mark.parametrize("cpu_defaults", ["avx2", "avx512-bf16", "amx"], indirect=True)
def test_defaults_by_kind_of_cpu(cpu_defaults):
    """`device.defaults`, the one place the CPU-dependent choices are made, for each kind of CPU
    this project runs on; `sdlab info --device` prints them."""
    bf16 = cpu_defaults.dtype == torch.bfloat16
    assert cpu_defaults.weight_dtype == (torch.bfloat16 if bf16 else torch.float16)
    assert cpu_defaults.vae_dtype == torch.float32
    # oneDNN's packed convolutions: on every AVX-512 CPU with the kernels, never on AVX2 ones
    assert cpu_defaults.pack_weights == (bf16 and cpu_packing_supported(torch.bfloat16))
    rows = dict(line.split("  ", 1) for line in devices.describe(torch.device("cpu")).splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["UNet / text encoder dtype"].split()[0] == devices.dtype_name(cpu_defaults.dtype)
    assert rows.get("UNet / text encoder weights", "").startswith("stored as fp16") == (not bf16)
    assert rows["VAE dtype"] == "fp32"
    assert (rows["denoiser weights"] == "pre-packed for oneDNN") == cpu_defaults.pack_weights


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_images_at_two_sizes(tmp_path):
    """`--compile` (torch.compile, static shapes) in the real pipeline: the eager images, and a
    second image size compiles anew instead of failing (symbolic sizes did, torch 2.13)."""
    path = save_native(tiny_bundle("sd1"), tmp_path / "tiny.safetensors")
    eager, compiled = (load_bundle(path, device="cpu", dtype=torch.float32) for _ in range(2))
    perf.prepare_for_inference(eager, "cpu", torch.float32)
    perf.prepare_for_inference(compiled, "cpu", torch.float32, compile=True)
    for size in (64, 96):
        req = GenerationRequest(prompt="a red circle", steps=4, sampler="DPM++ 2M", seed=3, width=size, height=size)
        want, got = (as_float_array(Pipeline(b).generate(req).images) for b in (eager, compiled))
        assert got.shape == want.shape and np.abs(got - want).max() * 255 <= 1, size


# ---------------------------------------------------------------- offload


def test_offload_moves_one_network_at_a_time():
    bundle = tiny_bundle("sd1")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g), torch.tensor([3.0])
    with torch.no_grad():
        ref = bundle.unet(x, t, ctx)
    perf.prepare_for_inference(bundle, "cpu", torch.float32, channels_last=False, offload=True)
    offload = bundle.unet.sdlab_offload
    assert perf.execution_device(bundle) == torch.device("cpu")
    tokens = torch.tensor([[49406, 320, 49407]])
    with torch.no_grad():
        bundle.text_encoders[0](tokens)
        assert offload.active is bundle.text_encoders[0]
        out = bundle.unet(x, t, ctx)
        assert offload.active is bundle.unet
        perf.decode_latents(bundle.vae, torch.randn(1, 4, 8, 8))
        assert offload.active is bundle.vae
        bundle.unet(x, t, ctx)
        perf.encode_images(bundle.vae, torch.rand(1, 3, 32, 32) * 2 - 1, tile=True)  # calls layers directly
        assert offload.active is bundle.vae
    assert torch.equal(out, ref)
    perf.disable_offload(bundle)
    assert not hasattr(bundle.unet, "sdlab_offload")


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_weights_are_packed_by_default_only_where_that_is_faster(monkeypatch, capability):
    """Packed convolutions gain on AVX-512 CPUs and lose (5-8x at SD's 1280 channels) on AVX2
    ones: prepare_for_inference packs by default only on the former."""
    if not cpu_packing_supported(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN convolutions")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu_packing_pays(torch.float32) == (capability == "AVX512")
    bundle = tiny_bundle("sd1")
    perf.prepare_for_inference(bundle, "cpu", torch.float32)
    w = bundle.unet.input_blocks[1][0].in_layers[2].weight
    assert w.is_mkldnn == (capability == "AVX512")
    if not w.is_mkldnn:
        assert w.is_contiguous(memory_format=torch.channels_last)


def test_load_prepares_for_inference_and_refuses_cpu_offload():
    """`sdlab.load` (the CLI's and the server's path) hands back a prepared bundle: channels-last
    VAE, UNet convolutions pre-packed for oneDNN (channels-last where packing is slower), no
    grads; --offload without a GPU is a clear error."""
    import sdlab
    from sdlab.errors import SdlabError

    pipe = sdlab.load(device="cpu", dtype=torch.float32)
    w = pipe.bundle.unet.input_blocks[1][0].in_layers[2].weight
    assert w.is_mkldnn if cpu_packing_pays(torch.float32) else w.is_contiguous(memory_format=torch.channels_last)
    assert not w.requires_grad
    assert pipe.bundle.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.bundle.device == torch.device("cpu")
    with pytest.raises(SdlabError, match="--offload"):
        sdlab.load(device="cpu", offload=True)


def test_reuse_freed_memory_keeps_large_freed_blocks_in_the_heap():
    """After `reuse_freed_memory` (the trainer calls it on the CPU) a 64 MB buffer comes from
    glibc's heap and stays there once freed, for the next one of that size, instead of being a
    fresh mapping that is unmapped on free (and faulted in page by page next time). Read from
    glibc's own accounting (mallinfo2), which does not depend on timing or on what else the heap
    holds; what it saves in a training step is measured by benchmarks/train_lora.py (against
    `--plain-malloc`). In a child process: the setting is process-wide."""
    import subprocess
    import sys

    code = """
import ctypes, json, torch
from sdlab import device as devices

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
MIB = 2**20

def mapped_and_free_in_heap():
    info = libc.mallinfo2()
    return info.hblkhd // MIB, info.fordblks // MIB  # bytes in mmapped blocks; free bytes kept in the heap

def round_trip():
    t = torch.empty(16 * MIB)  # 64 MB
    alive = mapped_and_free_in_heap()
    del t
    return alive, mapped_and_free_in_heap()

plain = round_trip()
assert devices.reuse_freed_memory()
print(json.dumps({"plain": plain, "reused": round_trip()}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if "mallinfo2" in out.stderr:
        pytest.skip("this C library is not glibc >= 2.33 (no mallinfo2)")
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads(out.stdout)
    (plain_alive, plain_freed), (reused_alive, reused_freed) = result["plain"], result["reused"]
    # By default glibc maps a block of 64 MB on its own and unmaps it on free...
    assert plain_alive[0] - plain_freed[0] >= 64
    # ...once told, it serves it from the heap and keeps it there, free, after `del`.
    assert reused_alive[0] == reused_freed[0] < 64
    assert reused_freed[1] - reused_alive[1] >= 64
