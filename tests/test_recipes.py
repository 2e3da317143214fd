"""The training recipes in recipes/: each parses and validates as a config (every key is one the
trainer knows), the commands in its header are ones `sdlab` accepts, and each runs as its header
says (the data made by its own `sdlab make-dataset` line, only smaller) for one step on the tiny
test models put where the recipe expects its model."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from safetensors import safe_open

from sdlab.cli import build_parser, main
from sdlab.training.config import load_config
from tests.tiny import save_native, tiny_bundle

RECIPES = Path(__file__).parents[1] / "recipes"
TASKS = ("pokemon_finetune_sd15", "character_lora_sdxl", "lycoris_loha_sd15", "textual_inversion_sd15")
# What each recipe is about, read back from its config.
EXPECTED = {
    "pokemon_finetune_sd15": lambda c: c.mode == "finetune" and (c.data.image_column, c.data.caption_column) == (
        "image", "text") and c.ema_decay > 0,
    "character_lora_sdxl": lambda c: c.mode == "lora" and c.lora.network_module == "networks.lora"
    and c.data.resolution == 1024 and c.data.enable_bucket,
    "lycoris_loha_sd15": lambda c: c.mode == "lora" and (c.lora.network_module, c.lora.algo, c.lora.conv_rank) == (
        "lycoris.kohya", "loha", 8),
    "textual_inversion_sd15": lambda c: c.mode == "embedding" and c.embedding.token_string == "sksobj"
    and c.embedding.num_vectors_per_token == 4,
}


def _commands(recipe: Path) -> list[list[str]]:
    """The `sdlab ...` lines of a recipe's header comment, as argv lists (without `sdlab`)."""
    lines = [line.lstrip("#").strip() for line in recipe.read_text(encoding="utf-8").splitlines()
             if line.startswith("#")]
    return [shlex.split(line.split("(")[0])[1:] for line in lines if line.startswith("sdlab ")]


def test_every_task_has_a_recipe():
    assert {p.stem for p in RECIPES.glob("*.toml")} >= set(TASKS)


@pytest.mark.parametrize("name", [p.stem for p in sorted(RECIPES.glob("*.toml"))])
def test_recipe_parses_and_its_commands_are_sdlabs(name):
    recipe = RECIPES / f"{name}.toml"
    cfg = load_config(recipe)  # an unknown key or a bad value fails here, naming it
    if name in EXPECTED:
        assert EXPECTED[name](cfg), name
        commands = _commands(recipe)
        assert [c[0] for c in commands] == ["make-dataset", "train"], commands
        parser = build_parser()
        for argv in commands:
            parser.parse_args(argv)  # argparse exits on anything it does not take
        make, train = commands
        assert Path(train[1]) == Path("recipes") / recipe.name
        # the data the make-dataset line writes is where the recipe reads it
        assert Path(make[2]) == cfg.data.folder or Path(make[2]).parent == cfg.data.folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The tiny test models, under the names the recipes give their base models."""
    root = tmp_path_factory.mktemp("recipes")
    save_native(tiny_bundle("sd1"), root / "models" / "v1-5-pruned-emaonly.safetensors")
    save_native(tiny_bundle("sdxl"), root / "models" / "sd_xl_base_1.0.safetensors")
    return root


@pytest.mark.parametrize("name", TASKS)
def test_recipe_runs_as_its_header_says(name, models, monkeypatch, capsys):
    """In a folder with the recipe's model file (a tiny one): its make-dataset line (4 images of
    32 px instead), then its train line with only what makes it a one-step run on a CPU."""
    monkeypatch.chdir(models)
    recipe = RECIPES / f"{name}.toml"
    make, train = _commands(recipe)
    for flag, value in (("--count", "4"), ("--size", "32")):
        make[make.index(flag) + 1] = value
    assert main(make) == 0
    sets = ["steps=1", "epochs=0", "mixed_precision=no", "validation.prompts=[]", "data.resolution=32",
            "data.min_bucket_reso=32", "data.max_bucket_reso=64", "data.bucket_reso_steps=32",
            f"output_dir={str(models / 'output' / name)!r}"]
    assert main([train[0], str(recipe), *[a for s in sets for a in ("--set", s)]]) == 0
    written = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote "))
    assert written.is_file() and written.parent == models / "output" / name
    with safe_open(str(written), "pt") as f:
        keys, meta = list(f.keys()), f.metadata() or {}
    if name == "textual_inversion_sd15":
        assert written.name == "sksobj.safetensors" and keys == ["emb_params"]
    elif name == "pokemon_finetune_sd15":
        assert any(k.startswith("model.diffusion_model.") for k in keys)
    else:
        assert meta["ss_network_module"] == load_config(recipe).lora.network_module
        assert any(k.startswith("lora_unet_") for k in keys)
