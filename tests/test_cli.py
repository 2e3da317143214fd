"""The command line as a newcomer meets it: a sub-command's mistakes print that command's usage,
--help gives every option's default, `sdlab samplers` lines up, and everything `sdlab generate`
can check without a model is checked before one loads."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
from PIL import Image

import sdlab
from sdlab.cli import build_parser, main
from sdlab.errors import SdlabError
from sdlab.pipeline import GenerationRequest


def _commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _help_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help as --help prints it (defaults added), by its longest flag."""
    formatter = parser._get_formatter()
    return {max(a.option_strings, key=len): formatter._expand_help(a) for a in parser._actions if a.option_strings}


@pytest.mark.parametrize("argv, message", [
    (["generate", "--strength", "2"], "unrecognized arguments: --strength"),
    (["generate", "x", "--steps", "many"], "argument --steps: invalid int value"),
    (["img2img", "x"], "the following arguments are required: --init"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["samplers", "extra"], "unrecognized arguments: extra"),
])
def test_usage_errors_print_the_commands_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err.startswith(f"usage: sdlab {argv[0]} ") and f"sdlab {argv[0]}: error: {message}" in err, err


def test_help_shows_defaults_and_no_none():
    """Every option with a default other than None (which means "as the model or PNG says") or a
    switch's False says it; "(default: None)" is never printed."""
    for name, parser in _commands().items():
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        helps = _help_of(parser)
        for action in parser._actions:
            default = action.default
            if action.option_strings and default not in (None, argparse.SUPPRESS) and not isinstance(default, bool):
                assert "default" in helps[max(action.option_strings, key=len)], (name, action.option_strings)
    assert "(default: 0)" in _help_of(_commands()["make-dataset"])["--seed"]


# Options of generate, img2img and inpaint that take a value and have no default to state.
NO_DEFAULT = {"--negative", "--preset", "--vae", "--refiner", "--style", "--from", "--init", "--mask"}


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint"])
def test_generation_help_states_every_default(command):
    """Every option that takes a value says what happens without it (switches are off)."""
    parser = _commands()[command]
    helps = _help_of(parser)
    missing = [flag for flag, text in helps.items()
               if flag not in NO_DEFAULT and "default" not in text and parser._option_string_actions[flag].nargs != 0]
    assert not missing, missing


@pytest.mark.parametrize("command, flag, default", [
    ("generate", "--steps", GenerationRequest.steps), ("generate", "--cfg", GenerationRequest.cfg_scale),
    ("generate", "--sampler", GenerationRequest.sampler), ("generate", "--schedule", GenerationRequest.schedule),
    ("generate", "--batch", GenerationRequest.batch_size), ("generate", "--count", GenerationRequest.n_iter),
    ("generate", "--clip-skip", GenerationRequest.clip_skip),
    ("generate", "--guidance-rescale", GenerationRequest.guidance_rescale),
    ("generate", "--variation-strength", GenerationRequest.subseed_strength),
    ("generate", "--refiner-switch", GenerationRequest.refiner_switch_at),
    ("generate", "--aesthetic-score", GenerationRequest.aesthetic_score),
    ("img2img", "--strength", GenerationRequest.denoising_strength), ("inpaint", "--strength", 1.0),
    ("inpaint", "--mask-blur", GenerationRequest.mask_blur),
    ("inpaint", "--padding", GenerationRequest.inpaint_full_res_padding),
])
def test_stated_defaults_are_the_requests(command, flag, default):
    value = f"{default:g}" if isinstance(default, (int, float)) else default
    assert f"default {value}" in _help_of(_commands()[command])[flag]


def test_samplers_columns_line_up(capsys):
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    samplers, schedules = out.split("Schedule types")
    for section, second in ((samplers, "aliases: "), (schedules, None)):
        rows = [line for line in section.splitlines() if line.startswith("  ")]
        assert len(rows) > 5
        # The second column starts at the same place on every row that has one.
        starts = {m.start(2) for m in (re.match(r"  (\S+(?: \S+)*)\s{2,}(\S)", r) for r in rows) if m}
        assert len(starts) == 1 and len([r for r in rows if re.search(r"\S\s{2,}\S", r)]) >= len(rows) - 1, rows
        if second:
            assert all(r[next(iter(starts)):].startswith(second) for r in rows if second in r)


# ---------------------------------------------------------------- checks before the model loads


def _loaded(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.fixture
def no_load(monkeypatch):
    """Model loading made to fail loudly: a check that needs no model must raise its own
    one-line error before it gets there."""
    from sdlab.checkpoints import loader

    monkeypatch.setattr(sdlab, "load", _loaded)
    monkeypatch.setattr(loader, "load_bundle", _loaded)


@pytest.fixture
def files(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "init.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("argv, words", [
    (["img2img", "x", "--init", "{d}/init.png", "--strength", "2"], "denoising strength must be between 0 and 1"),
    (["generate", "x", "-W", "100"], "width 100 is not a positive multiple of 8"),
    (["generate", "x", "-H", "60"], "height 60 is not a positive multiple of 8"),
    (["generate", "x", "--steps", "0"], "steps must be at least 1"),
    (["generate", "x", "--batch", "0"], "batch size and batch count must be at least 1"),
    (["generate", "x", "--sampler", "Eulerr"], "unknown sampler 'Eulerr'"),
    (["generate", "x", "--schedule", "karass"], "unknown schedule 'karass'"),
    (["generate", "x", "--dtype", "fp7"], "fp7"),
    (["img2img", "x", "--init", "{d}/missing.png"], "no such init image file"),
    (["inpaint", "x", "--init", "{d}/init.png", "--mask", "{d}/broken.png"], "cannot read the mask"),
    (["generate", "x <lora:nowhere:1>"], "'nowhere' not found"),
    (["generate", "x", "--vae", "nowhere.safetensors"], "'nowhere.safetensors' not found"),
    (["generate", "x", "--refiner", "nowhere.safetensors"], "nowhere.safetensors: no such file or folder"),
    (["generate", "x", "-m", "nowhere.safetensors"], "nowhere.safetensors: no such file or folder"),
])
def test_generate_checks_everything_it_can_before_loading_the_model(no_load, files, argv, words):
    argv = [a.replace("{d}", str(files)) for a in argv] + ["--models-dir", str(files / "models"), "--device", "cpu"]
    args = build_parser().parse_args(argv)
    with pytest.raises(SdlabError, match=re.escape(words)) as e:
        args.func(args)
    assert "\n" not in str(e.value)


def test_convert_checks_its_output_name_before_loading(no_load):
    args = build_parser().parse_args(["convert", "demo", "out.bin", "--to", "single"])
    with pytest.raises(SdlabError, match=r"out.bin: single-file output must end in \.safetensors"):
        args.func(args)


def test_a_vae_and_a_refiner_named_on_the_command_line_are_used(tmp_path):
    """Found before the model loads, used after: a VAE by its name in the models folder, a
    refiner by its path; the infotext names both."""
    from sdlab.infotext import parse_infotext

    from .tiny import save_native, tiny_bundle

    model = save_native(tiny_bundle("sd1"), tmp_path / "tiny.safetensors")
    (tmp_path / "models" / "VAE").mkdir(parents=True)
    save_native(tiny_bundle("sd1", seed=1), tmp_path / "models" / "VAE" / "other-vae.safetensors")
    args = build_parser().parse_args(["generate", "x", "-m", str(model), "--vae", "other-vae", "--refiner", str(model),
                                      "--models-dir", str(tmp_path / "models"), "--steps", "2", "-W", "32", "-H", "32",
                                      "--device", "cpu", "-o", str(tmp_path / "out.png")])
    args.func(args)
    params = parse_infotext(Image.open(tmp_path / "out.png").info["parameters"])
    assert (params["VAE"], params["Refiner"]) == ("other-vae", "tiny")
