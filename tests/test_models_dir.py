"""The models folder: names to files as the web UI resolves them, refusal of names that
lead outside, hashes and their cache, `sdlab models`, and a separate VAE file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from sdlab.checkpoints.diffusers_keys import vae_to_diffusers
from sdlab.checkpoints.io import save_safetensors
from sdlab.cli import main as cli_main
from sdlab.errors import SdlabError
from sdlab.models_dir import ENV_VAR, HASH_CACHE, ModelsDir, load_vae_into

from .tiny import tiny_bundle


@pytest.fixture
def models(tmp_path) -> ModelsDir:
    root = tmp_path / "models"
    files = {
        "Stable-diffusion/v1-5-pruned-emaonly.safetensors": b"checkpoint one",
        "Stable-diffusion/anime/Counterfeit.ckpt": b"checkpoint two",
        "Stable-diffusion/notes.txt": b"not a model",
        "Stable-diffusion/folder-model/model_index.json": b"{}",
        "Stable-diffusion/folder-model/unet/diffusion_pytorch_model.safetensors": b"x",
        "Lora/style.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}tensor data",
        "Lora/characters/Hero.pt": b"lora two",
        "Lora/.hidden.safetensors": b"hidden",
        "embeddings/bad-hands.pt": b"embedding",
        "VAE/vae-ft-mse-840000.safetensors": b"vae",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.safetensors", root / "Lora" / "escape.safetensors")
    os.symlink(root / "Lora" / "style.safetensors", root / "Lora" / "alias.safetensors")  # stays inside: fine
    return ModelsDir(root)


def test_listing(models):
    assert [m.name for m in models.list_checkpoints()] == ["anime/Counterfeit", "folder-model", "v1-5-pruned-emaonly"]
    assert [m.name for m in models.list_loras()] == ["alias", "characters/Hero", "style"]  # no hidden, no escape
    assert [m.name for m in models.list_embeddings()] == ["bad-hands"]
    assert [m.name for m in models.list_vaes()] == ["vae-ft-mse-840000"]
    assert ModelsDir(models.root / "nowhere").list_loras() == []


def test_resolution_like_the_web_ui(models):
    root = models.root.resolve()
    sd = root / "Stable-diffusion"
    assert models.resolve_checkpoint("v1-5-pruned-emaonly") == sd / "v1-5-pruned-emaonly.safetensors"
    assert models.resolve_checkpoint("v1-5-pruned-emaonly.safetensors") == sd / "v1-5-pruned-emaonly.safetensors"
    assert models.resolve_checkpoint("v1-5-pruned-emaonly.safetensors [6ce0161689]") == \
        sd / "v1-5-pruned-emaonly.safetensors"  # the web UI's checkpoint title
    assert models.resolve_checkpoint("anime/Counterfeit") == sd / "anime" / "Counterfeit.ckpt"
    assert models.resolve_checkpoint("Counterfeit") == sd / "anime" / "Counterfeit.ckpt"  # found in a subfolder
    assert models.resolve_checkpoint("counterfeit") == sd / "anime" / "Counterfeit.ckpt"  # case as a last resort
    assert models.resolve_checkpoint("folder-model") == sd / "folder-model"
    assert models.resolve_lora("Hero") == root / "Lora" / "characters" / "Hero.pt"
    assert models.resolve_lora("style") == root / "Lora" / "style.safetensors"
    assert models.resolve_lora("alias") == root / "Lora" / "style.safetensors"
    assert models.resolve_vae("vae-ft-mse-840000") == root / "VAE" / "vae-ft-mse-840000.safetensors"
    assert models.resolve_embedding("bad-hands") == root / "embeddings" / "bad-hands.pt"
    absolute = str(root / "Lora" / "style.safetensors")
    assert models.resolve_lora(absolute) == root / "Lora" / "style.safetensors"

    with pytest.raises(SdlabError, match=r"LoRA 'nope' not found in .*Lora \(available: alias, characters/Hero, style\)"):
        models.resolve_lora("nope")
    with pytest.raises(SdlabError, match="checkpoint 'notes' not found"):
        models.resolve_checkpoint("notes")  # .txt is not a model
    with pytest.raises(SdlabError, match="does not exist"):
        ModelsDir(models.root / "nowhere").resolve_lora("style")


@pytest.mark.parametrize("name", ["../../secret", "../../secret.safetensors", "../VAE/vae-ft-mse-840000",
                                  "escape", "escape.safetensors", "characters/../../../secret",
                                  "/etc/passwd", "/etc/passwd\x00.safetensors", ""])
def test_names_leading_outside_are_refused(models, name):
    with pytest.raises(SdlabError, match="outside|invalid"):
        models.resolve_lora(name)


def test_hashes_and_their_cache(models, monkeypatch):
    from sdlab.checkpoints import loader

    path = models.resolve_checkpoint("v1-5-pruned-emaonly")
    expected = hashlib.sha256(b"checkpoint one").hexdigest()
    assert models.sha256(path) == expected
    assert models.short_hash(path) == expected[:10]
    cache = json.loads((models.root / HASH_CACHE).read_text())
    assert cache[str(path)]["sha256"] == expected

    # A new ModelsDir (a new process) reads the cache instead of the file.
    monkeypatch.setattr(loader, "file_sha256", lambda p: pytest.fail(f"hashed {p} again"))
    assert ModelsDir(models.root).short_hash(path) == expected[:10]
    # A changed file (size and mtime) is hashed again.
    path.write_bytes(b"checkpoint one, retrained")
    calls = []
    monkeypatch.setattr(loader, "file_sha256", lambda p: calls.append(p) or "f" * 64)
    assert ModelsDir(models.root).short_hash(path) == "f" * 10 and calls == [path]
    monkeypatch.undo()

    # LoRA hash: kohya's "addnet" hash of the tensor data after the safetensors header, 12 digits.
    lora = models.resolve_lora("style")
    assert models.lora_hash(lora) == hashlib.sha256(b"tensor data").hexdigest()[:12]
    assert models.infotext_hash("lora", lora) == models.lora_hash(lora)
    assert models.infotext_hash("embedding", models.resolve_embedding("bad-hands")) == \
        hashlib.sha256(b"embedding").hexdigest()[:12]
    assert models.infotext_hash("checkpoint", models.resolve_checkpoint("folder-model")) is None
    assert not list(models.root.glob(f".{HASH_CACHE}.*"))  # no temporary files left behind


def test_default_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert ModelsDir().root == tmp_path / "elsewhere"
    monkeypatch.delenv(ENV_VAR)
    assert ModelsDir().root == type(tmp_path)("models")


def test_cli_lists_with_hashes(models, capsys):
    assert cli_main(["models", "--models-dir", str(models.root)]) == 0
    out = capsys.readouterr().out
    assert "v1-5-pruned-emaonly" in out and "characters/Hero" in out and "bad-hands" in out
    assert hashlib.sha256(b"checkpoint one").hexdigest()[:10] in out
    assert hashlib.sha256(b"vae").hexdigest()[:10] in out
    assert "escape" not in out
    assert cli_main(["models", "--models-dir", str(models.root / "missing")]) == 1


def test_module_import_is_light():
    code = "import sys, sdlab.models_dir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------- separate VAE


def test_separate_vae_file(tmp_path):
    bundle = tiny_bundle("sd1")
    original = {k: v.clone() for k, v in bundle.vae.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    wanted = {k: torch.randn(v.shape, generator=g) for k, v in original.items()}
    # Released VAE .ckpt/.safetensors: no prefix, with training leftovers.
    save_safetensors({**wanted, "loss.logvar": torch.zeros(()), "model_ema.decay": torch.ones(())},
                     tmp_path / "plain.safetensors")
    save_safetensors({f"first_stage_model.{k}": v for k, v in wanted.items()}, tmp_path / "prefixed.safetensors")
    save_safetensors(vae_to_diffusers(wanted, bundle.config.vae), tmp_path / "diffusers.safetensors")
    torch.save({"state_dict": wanted}, tmp_path / "old.pt")
    unet_before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    for name in ("plain.safetensors", "prefixed.safetensors", "diffusers.safetensors", "old.pt"):
        bundle.vae.load_state_dict(original)
        load_vae_into(bundle, tmp_path / name)
        for k, v in bundle.vae.state_dict().items():
            assert torch.equal(v, wanted[k]), (name, k)
    assert all(torch.equal(v, unet_before[k]) for k, v in bundle.unet.state_dict().items())

    # A VAE of another shape: one clear error, the model's VAE unchanged.
    save_safetensors({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in wanted.items()}, tmp_path / "big.safetensors")
    with pytest.raises(SdlabError, match="another model family"):
        load_vae_into(bundle, tmp_path / "big.safetensors")
    save_safetensors({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "partial.safetensors")
    with pytest.raises(SdlabError, match="not a VAE"):
        load_vae_into(bundle, tmp_path / "partial.safetensors")
    assert all(torch.equal(v, wanted[k]) for k, v in bundle.vae.state_dict().items())
