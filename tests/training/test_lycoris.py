"""LyCORIS training (`network_module = "lycoris.kohya"`, algo locon / loha / lokr) against the
`lycoris-lora` package itself: the same modules from the same seed, and trained files that its
own loader reads into a diffusers UNet and transformers text encoder with the outputs of sdlab's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from sdlab.errors import SdlabError
from sdlab.training.config import load_config
from sdlab.training.lora_network import LoHaModule, LoKrModule, LoRAModule, factorization
from sdlab.training.trainer import Trainer

lycoris = pytest.importorskip("lycoris")


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(5)
    return nn.Linear(48, 40) if kind == "linear" else nn.Conv2d(24, 32, 3, padding=1)


@pytest.mark.parametrize("algo, rank, factor", [("loha", 4, -1), ("lokr", 2, -1), ("lokr", 2, 4), ("lokr", 8, -1),
                                                ("locon", 4, -1)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_modules_are_lycoris_modules(algo, rank, factor, kind):
    """From the same seed our module has LyCORIS's factors bit for bit (names, shapes, init); with
    all factors random the hooked layer's output equals LyCORIS's module applied to the layer."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    base = _layer(kind)
    alpha = 1.5
    torch.manual_seed(0)
    ours = {"loha": lambda: LoHaModule(base, rank, alpha), "lokr": lambda: LoKrModule(base, rank, alpha, factor),
            "locon": lambda: LoRAModule(base, rank, alpha)}[algo]()
    torch.manual_seed(0)
    theirs = {"loha": LohaModule, "lokr": LokrModule, "locon": LoConModule}[algo](
        "lora_unet_x", base, 1.0, rank, alpha, **({"factor": factor} if algo == "lokr" else {}))
    ours_sd = {k: v for k, v in ours.state_dict().items()}
    theirs_sd = {k: v for k, v in theirs.state_dict().items()}
    assert ours_sd.keys() == theirs_sd.keys()
    for k in ours_sd:
        assert torch.equal(ours_sd[k], theirs_sd[k]), k
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in ours.named_parameters():
            v.copy_(torch.randn(v.shape, generator=g) * 0.3)
            dict(theirs.named_parameters())[k].copy_(v)
    x = torch.randn((2, 48) if kind == "linear" else (2, 24, 8, 8), generator=g)
    with torch.no_grad():
        plain = base(x)
        handle = base.register_forward_hook(ours.hook)
        mine = base(x)
        handle.remove()
        theirs.apply_to()
        lyco = base(x)
    assert (mine - plain).abs().max() > 1e-2
    # fp32 rounding of unit-scale outputs: AVX2's conv kernels sum in another order than AVX-512's.
    torch.testing.assert_close(mine, lyco, rtol=0, atol=1e-5)


def test_factorization_is_lycoris():
    from lycoris.functional.general import factorization as theirs

    for dim in (1, 7, 32, 40, 64, 127, 128, 250, 320, 360, 768, 1280):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dim, factor) == theirs(dim, factor)


def _config(tmp_path, shapes, base_model, *args: str):
    return load_config(None, [f"data.folder={str(shapes)!r}", "data.resolution=32", "data.enable_bucket=false",
                              f"output_dir={str(tmp_path / 'out')!r}", "batch_size=2", "lr=3e-2", "mode='lora'",
                              f"base_model={str(base_model)!r}", "steps=1", "lora.rank=2", "lora.alpha=1",
                              "lora.train_text_encoder=true", "save_dtype='fp32'", *args])


@pytest.fixture(scope="module")
def diffusers_models(tmp_path_factory):
    """The tiny SD1 base as diffusers' UNet and transformers' text encoder (what LyCORIS's kohya
    network wraps in kohya's scripts)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
    from tests.tiny import tiny_bundle

    b = tiny_bundle("sd1", seed=0)
    folder = tmp_path_factory.mktemp("diffusers") / "sd1"
    write_diffusers_folder(b.state_dict(), b.config, folder)
    return folder, UNet2DConditionModel.from_pretrained(folder / "unet"), CLIPTextModel.from_pretrained(
        folder / "text_encoder")


@pytest.mark.parametrize("args", [
    ["lora.network_args=['algo=loha', 'conv_dim=2', 'conv_alpha=1']", "lora.network_module='lycoris.kohya'"],
    ["lora.network_module='lycoris.kohya'", "lora.algo='lokr'", "lora.factor=4"],
])
def test_trained_lycoris_loads_in_sdlab_and_in_lycoris(tmp_path, shapes, base_model, diffusers_models, args,
                                                       monkeypatch):
    """A LoHa and a LoKr trained here (UNet and text encoder): the file has LyCORIS's keys and
    kohya's metadata naming the algorithm; sdlab's loader and LyCORIS's own
    (`lycoris.kohya.create_network_from_weights` on diffusers' UNet and transformers' CLIP) give
    the same UNet and text-encoder outputs within 1e-5; merging equals the training network."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # lycoris-lora 4.1.3 lists diffusers' TimestepEmbedding class (for Anima) beside the names
    # time_embedding.linear_1/2, so building its network on an SD UNet fails on the duplicate;
    # without the class, the same modules under the same names.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE",
                        [m for m in LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"])

    from sdlab.checkpoints.loader import load_bundle
    from sdlab.lora import LoraUse, apply_loras, load_lora

    cfg = _config(tmp_path, shapes, base_model, *args)
    t = Trainer(cfg, progress_bar=False)
    try:
        path = t.train()
    finally:
        t.close()
    algo = cfg.lora.algo
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == algo
    factor = "hada_w1_a" if algo == "loha" else "lokr_w1"
    names = {k.rsplit(".", 1)[0] for k in keys}
    # every layer of LyCORIS's preset "full": the UNet's convolutions too, the text encoder's MLPs
    for name in ("lora_unet_conv_in", "lora_unet_time_embedding_linear_1", "lora_unet_down_blocks_0_resnets_0_conv1",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        assert name in names and f"{name}.{factor}" in keys, name
    lora = load_lora(path)
    assert {m.kind for m in lora.modules} == {algo}

    folder, unet, te = diffusers_models
    # transformers 5's CLIPTextModel dropped the `text_model.` level that kohya's names (and
    # transformers 4's) have: put it back around the same modules for LyCORIS's name lookup.
    named_te = te if hasattr(te, "text_model") else nn.ModuleDict({"text_model": te})
    network, _ = create_network_from_weights(1.0, str(path), None, named_te, unet)
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len(names)  # every module read
    bundle = load_bundle(base_model, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, bundle.config.unet.context_dim, generator=g)
    tokens = bundle.tokenizers[0](["a red circle on a blue background", ""])
    t_ = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        base_out = bundle.unet(x, t_, ctx)
        with apply_loras(bundle, [LoraUse(lora, 1.0, 1.0)]):
            ours_unet, ours_te = bundle.unet(x, t_, ctx), bundle.text_encoders[0](tokens).hidden
            merged = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
        network.apply_to(named_te, unet, True, True)
        theirs_unet, theirs_te = unet(x, t_, ctx).sample, te(tokens)[0]
        network.restore() if hasattr(network, "restore") else None
    effect = (ours_unet - base_out).abs().max().item()
    diff_unet, diff_te = (ours_unet - theirs_unet).abs().max().item(), (ours_te - theirs_te).abs().max().item()
    print(f"{algo}: sdlab vs LyCORIS, UNet {diff_unet:.2e}, text {diff_te:.2e}; the network's effect {effect:.2e}")
    assert effect > 1e-3
    assert diff_unet < 1e-5 and diff_te < 1e-5
    # the training network merged into its base equals what sdlab's loader merged from the file
    t.lora.merge()
    for k, v in t.bundle.unet.state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)


def test_unknown_algorithm_and_misused_options(tmp_path, shapes, base_model):
    with pytest.raises(SdlabError, match="the LyCORIS algorithms sdlab trains are lora, locon, loha, lokr"):
        _config(tmp_path, shapes, base_model, "lora.network_module='lycoris.kohya'", "lora.algo='ia3'")
    with pytest.raises(SdlabError, match="needs lora.network_module = \"lycoris.kohya\""):
        _config(tmp_path, shapes, base_model, "lora.network_args=['algo=loha']")
    with pytest.raises(SdlabError, match="network_args 'conv=4': expected key=value with a key sdlab knows"):
        _config(tmp_path, shapes, base_model, "lora.network_args=['conv=4']")
    with pytest.raises(SdlabError, match="lora.network_module must be one of"):
        _config(tmp_path, shapes, base_model, "lora.network_module='lycoris'")


def test_kohya_locon_through_network_args(tmp_path, shapes, base_model):
    """kohya's plain LoCon: `network_args = ["conv_dim=2", "conv_alpha=1"]` on networks.lora puts
    LoRA on the 3x3 convolutions too; the metadata says so as kohya writes it."""
    cfg = _config(tmp_path, shapes, base_model, "lora.network_args=['conv_dim=2', 'conv_alpha=1']", "steps=1",
                  "lora.train_text_encoder=false")
    assert (cfg.lora.conv_rank, cfg.lora.conv_alpha) == (2, 1.0)
    t = Trainer(cfg, progress_bar=False)
    try:
        conv = [m for m in t.lora.loras.values() if m.lora_down.weight.ndim == 4 and m.lora_down.weight.shape[-1] == 3]
        assert conv and all(m.rank == 2 for m in conv)
        assert "lora_unet_conv_in" not in t.lora.loras  # kohya's LoCon: ResBlocks and resamplers only
    finally:
        t.close()
