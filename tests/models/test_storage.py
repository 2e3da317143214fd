"""Weights stored narrow, computed wide (`models.storage`): exactly the network whose weights
were rounded to the narrow dtype, at rest in the narrow dtype, and undone without a trace."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from sdlab import perf
from sdlab.checkpoints.io import save_safetensors
from sdlab.checkpoints.loader import load_bundle
from sdlab.device import default_weight_dtype, parse_weight_dtype
from sdlab.errors import SdlabError
from sdlab.lora import apply_loras, kohya_name, load_lora
from sdlab.models import storage
from sdlab.pipeline import GenerationRequest, Pipeline

from ..tiny import as_float_array, rounded_through, save_native, tiny_bundle


def _inputs(bundle, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = bundle.unet.cfg
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 5, cfg.context_dim, generator=g)
    y = torch.randn(2, cfg.adm_in_channels, generator=g) if cfg.adm_in_channels else None
    tokens = torch.randint(0, 1000, (2, 77), generator=g)
    return x, torch.tensor([10.0, 500.0]), ctx, y, tokens


def _outputs(bundle, inputs) -> list[torch.Tensor]:
    x, t, ctx, y, tokens = inputs
    with torch.no_grad():
        return [bundle.unet(x, t, ctx, y)] + [te(tokens).hidden for te in bundle.text_encoders]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("narrow", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_narrow_weights_compute_exactly_the_rounded_network(family, narrow):
    """UNet and text encoders (both CLIP layouts, OpenCLIP's fused in_proj_weight) with their
    matrices stored narrow give, bit for bit, what the fp32 networks with those matrices rounded
    to the narrow dtype give; the narrow copies are what stays in memory, under the same keys."""
    reference = rounded_through(tiny_bundle(family), narrow)
    stored = tiny_bundle(family)
    keys = {n: set(net.state_dict()) for n, net in stored.networks().items()}
    perf.prepare_for_inference(reference, "cpu", torch.float32, pack_weights=False)
    perf.prepare_for_inference(stored, "cpu", torch.float32, weight_dtype=narrow)
    for net in (stored.unet, *stored.text_encoders):
        names = storage.narrowable(net, narrow)
        tables = [n for n in names if "embedding" in n]
        assert bool(tables) == (net is not stored.unet and narrow != torch.float8_e4m3fn), tables
        assert any(n.endswith("in_proj_weight") for n in names) == (net is not stored.unet and family != "sd1"
                                                                    and net.cfg.layout == "openclip")
        for name, p in net.named_parameters():
            assert p.dtype == (narrow if name in names else torch.float32), name
        assert storage.storage_dtype(net) == narrow and storage.compute_dtype(net) == torch.float32
    assert stored.dtype == torch.float32 and next(stored.vae.parameters()).dtype == torch.float32
    assert {n: set(net.state_dict()) for n, net in stored.networks().items()} == keys
    inputs = _inputs(stored)
    for want, got in zip(_outputs(reference, inputs), _outputs(stored, inputs)):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    # Prepared again without narrow weights: plain fp32 modules, the same numbers.
    perf.prepare_for_inference(stored, "cpu", torch.float32, pack_weights=False)
    assert not storage.stores_narrow(stored.unet) and all(p.dtype == torch.float32 for p in stored.unet.parameters())
    assert all(torch.equal(a, b) for a, b in zip(_outputs(reference, inputs), _outputs(stored, inputs)))


def test_fp16_file_loads_losslessly_into_fp16_storage(tmp_path):
    """An fp16 checkpoint (what most downloads are) read straight into fp16 storage: the images
    are those of the same file loaded into fp32, bit for bit, with about half the UNet's memory."""
    path = save_native(tiny_bundle("sd1"), tmp_path / "tiny-fp16.safetensors", dtype=torch.float16)
    wide = load_bundle(path, device="cpu", dtype=torch.float32)
    narrow = load_bundle(path, device="cpu", dtype=torch.float32, weight_dtype=torch.float16)
    assert storage.stores_narrow(narrow.unet) and narrow.unet.time_embed[0].weight.dtype == torch.float16
    perf.prepare_for_inference(wide, "cpu", torch.float32, pack_weights=False)
    perf.prepare_for_inference(narrow, "cpu", torch.float32, weight_dtype=torch.float16)

    def unet_bytes(bundle):
        return sum(p.numel() * p.element_size() for p in bundle.unet.parameters())

    assert unet_bytes(narrow) < 0.55 * unet_bytes(wide)
    req = GenerationRequest(prompt="a red circle on a blue background", negative_prompt="blurry", steps=6,
                            sampler="DPM++ 2M", seed=3, width=64, height=64)
    want, got = (as_float_array(Pipeline(b).generate(req).images) for b in (wide, narrow))
    assert (got == want).all()


def test_autograd_through_narrow_weights_gets_fresh_copies():
    """With autograd on, kernels may keep their weights for backward; the scratch buffer is then
    not used, so input gradients are those of the rounded network."""
    reference = rounded_through(tiny_bundle("sd1"), torch.float16)
    stored = storage.set_dtypes(tiny_bundle("sd1").unet.requires_grad_(False), torch.float32, torch.float16)
    x, t, ctx, _, _ = _inputs(reference)
    grads = []
    for unet in (reference.unet, stored):
        xi = x.clone().requires_grad_(True)
        unet(xi, t, ctx).square().sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    assert all(p.dtype == torch.float16 for m, a in storage.narrowable(stored, torch.float16).values()
               for p in [getattr(m, a)])


def test_out_of_range_weights_stay_wide_and_errors_restore_the_narrow_weights():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).requires_grad_(False)
    with torch.no_grad():
        net[1].weight[0, 0] = 1e6  # beyond fp16's 65504
    storage.set_dtypes(net, torch.float32, torch.float16)
    assert net[0].weight.dtype == torch.float16 and net[1].weight.dtype == torch.float32
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 5))  # wrong width: fails inside the upcast forward
    assert net[0].weight.dtype == torch.float16  # put back by the lease, not left pointing at scratch memory


def _fp16_unet_and_inputs():
    bundle = tiny_bundle("sd1")
    unet = storage.set_dtypes(bundle.unet.requires_grad_(False), torch.float32, torch.float16)
    x, t, ctx, _, _ = _inputs(bundle)
    return unet, (x, t, ctx)


def test_inference_mode_and_no_grad_share_the_scratch_buffer():
    unet, inputs = _fp16_unet_and_inputs()
    with torch.inference_mode():
        first = unet(*inputs)
    with torch.no_grad():
        assert torch.equal(unet(*inputs), first)


def test_threads_share_a_network_with_narrow_weights():
    unet, inputs = _fp16_unet_and_inputs()
    with torch.no_grad():
        want = unet(*inputs)
    results = [None] * 4

    def run(i):
        with torch.no_grad():
            results[i] = unet(*inputs)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(r, want) for r in results)


def test_lora_merges_into_narrow_weights_and_restores_them(tmp_path):
    """A LoRA merged into fp16-stored weights is summed in fp32 and rounded once (as the web UIs
    merge into an fp16 model); restoring gives the stored weights back bit for bit."""
    wide = rounded_through(tiny_bundle("sd1"), torch.float16)  # the same base values, in fp32
    narrow = tiny_bundle("sd1")
    perf.prepare_for_inference(wide, "cpu", torch.float32, pack_weights=False)
    perf.prepare_for_inference(narrow, "cpu", torch.float32, weight_dtype=torch.float16)
    g = torch.Generator().manual_seed(1)
    paths = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2")
    sd = {}
    for path in paths:
        layer = wide.unet.get_submodule(path)
        name = kohya_name(path, "unet", wide.unet.cfg)
        if isinstance(layer, nn.Conv2d):
            down = torch.randn(4, layer.in_channels, 3, 3, generator=g)
            up = torch.randn(layer.out_channels, 4, 1, 1, generator=g)
        else:
            down, up = torch.randn(4, layer.in_features, generator=g), torch.randn(layer.out_features, 4, generator=g)
        sd.update({f"{name}.lora_down.weight": down * 0.3, f"{name}.lora_up.weight": up * 0.3,
                   f"{name}.alpha": torch.tensor(4.0)})
    save_safetensors(sd, tmp_path / "lora.safetensors")
    lora = load_lora(tmp_path / "lora.safetensors")
    before = {k: v.clone() for k, v in narrow.unet.state_dict().items()}
    inputs = _inputs(wide)
    plain = _outputs(narrow, inputs)[0]
    with apply_loras(wide, [(lora, 1.0, 1.0)]), apply_loras(narrow, [(lora, 1.0, 1.0)]):
        for path in paths:
            merged = narrow.unet.get_submodule(path).weight
            assert merged.dtype == torch.float16
            assert torch.equal(merged, wide.unet.get_submodule(path).weight.half())
        want, got = _outputs(wide, inputs)[0], _outputs(narrow, inputs)[0]
        assert (got - plain).abs().max() > 10 * (got - want).abs().max()  # the LoRA's effect, beyond rounding
    assert all(torch.equal(v, before[k]) for k, v in narrow.unet.state_dict().items())


def test_defaults_narrow_only_when_no_dtype_is_named(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_weight_dtype(cpu, torch.float32) == torch.float16
    assert default_weight_dtype(cpu, torch.bfloat16) == torch.bfloat16
    assert default_weight_dtype(cuda, torch.float16) == torch.float16
    monkeypatch.setattr(perf.devices, "default_dtype", lambda device: torch.float32)
    assert perf.inference_dtypes(cpu, None, None) == (torch.float32, torch.float16)
    assert perf.inference_dtypes(cpu, torch.float32, None) == (torch.float32, torch.float32)  # named: exact
    assert perf.inference_dtypes(cpu, None, None, compile=True) == (torch.float32, torch.float32)
    assert perf.inference_dtypes(cpu, torch.float16, torch.float8_e4m3fn) == (torch.float16, torch.float8_e4m3fn)
    with pytest.raises(SdlabError, match="wider"):
        perf.inference_dtypes(cpu, torch.float16, torch.float32)
    with pytest.raises(SdlabError, match="--compile"):
        perf.prepare_for_inference(tiny_bundle("sd1"), "cpu", torch.float32, compile=True,
                                   weight_dtype=torch.float16)
    assert parse_weight_dtype("FP8_E4M3FN") == torch.float8_e4m3fn and parse_weight_dtype("fp16") == torch.float16
    with pytest.raises(SdlabError, match="fp8_e4m3fn"):
        parse_weight_dtype("int4")


def test_cli_weight_dtype_reaches_the_pipeline(tmp_path, monkeypatch):
    import sdlab
    from sdlab.cli import main

    seen = {}
    real_load = sdlab.load

    def load(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        seen["weights"] = storage.storage_dtype(pipe.bundle.unet)
        return pipe

    monkeypatch.setattr(sdlab, "load", load)
    out = tmp_path / "out.png"
    main(["generate", "a red circle on a blue background", "--steps", "2", "--weight-dtype", "bf16",
          "--device", "cpu", "-o", str(out)])
    assert out.is_file() and seen["weights"] == torch.bfloat16
