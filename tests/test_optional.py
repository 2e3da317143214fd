"""Optional dependencies: without one, the command that needs it says in one line which command
installs it and exits with 2, never with a ModuleNotFoundError traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdlab.errors import MissingDependency
from sdlab.optional import require

CASES = [  # (missing modules, argv, start of the message, extra)
    (["fastapi", "uvicorn"], ["serve", "--port", "0"], "sdlab serve needs fastapi, which is not installed", "serve"),
    (["uvicorn"], ["serve", "--port", "0"], "sdlab serve needs uvicorn, which is not installed", "serve"),
    (["huggingface_hub"], ["info", "someone/some-model"],
     "someone/some-model looks like a Hugging Face repo id; downloading it needs huggingface_hub", "hub"),
    (["huggingface_hub"], ["generate", "a cat", "--model", "someone/some-model", "-o", "out.png"],
     "someone/some-model looks like a Hugging Face repo id; downloading it needs huggingface_hub", "hub"),
    (["accelerate"], ["train", "--mode", "lora", "--base-model", "model.safetensors", "--data", ".", "--steps", "1"],
     "training needs accelerate, which is not installed", "train"),
]
OPTIONAL = ["fastapi", "uvicorn", "huggingface_hub", "accelerate"]

# Runs the `sdlab` entry point once per case, in one process (torch is imported once), with the
# case's modules made unimportable: a None in sys.modules makes `import name` (and `import
# name.sub`) raise ModuleNotFoundError, as for a package that is not installed. Anything that
# escapes main() is caught here and reported with its traceback.
RUN = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    from sdlab.cli import main
    results = []
    for modules, argv in json.loads(sys.argv[1]):
        saved = {name: sys.modules.pop(name, None) for name in modules}
        sys.modules.update(dict.fromkeys(modules))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own exits (--help)
                code = e.code
            except BaseException:
                code = None
                err.write(traceback.format_exc())
        for name, module in saved.items():
            del sys.modules[name]
            if module is not None:
                sys.modules[name] = module
        results.append([code, out.getvalue(), err.getvalue()])
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list, Path]:
    cwd = tmp_path_factory.mktemp("cwd")
    cases = [(modules, argv) for modules, argv, _, _ in CASES] + [(OPTIONAL, ["--help"])]
    # A check that failed to stop `serve` would leave a server running: the timeout ends that.
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(cases)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), cwd


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[1][0]}-without-{c[0][-1]}" for c in CASES])
def test_a_missing_optional_dependency_is_one_line_and_exit_code_2(runs, case):
    _, argv, message, extra = CASES[case]
    code, out, err = runs[0][case]
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sdlab: error: {message}")
    assert f'pip install "sdlab[{extra}]"' in lines[0] and f'pip install -e ".[{extra}]"' in lines[0]
    assert list(runs[1].iterdir()) == []  # each stopped before doing anything


def test_help_lists_every_command_without_the_optional_dependencies(runs):
    code, out, err = runs[0][-1]
    assert code == 0 and "Traceback" not in err
    for command in ("serve", "train", "generate", "info"):
        assert f"    {command} " in out


def test_require_returns_the_module_or_says_how_to_install_it(tmp_path, monkeypatch):
    import json

    assert require("json", extra=None, purpose="reading") is json
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingDependency) as e:
        require("fastapi", extra="serve", purpose="sdlab serve")
    assert str(e.value) == ('sdlab serve needs fastapi, which is not installed: pip install "sdlab[serve]" '
                            '(in a source checkout: pip install -e ".[serve]")')
    with pytest.raises(MissingDependency, match="^training needs sdlab_test_absent, which is not installed"):
        require("sdlab_test_absent.utils", extra="train", purpose="training")  # named by its package
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependency, match=r'^optimizer adamw8bit needs bitsandbytes, which is not installed: '
                                                r'pip install bitsandbytes, or use optimizer = "adamw"$'):
        require("bitsandbytes", extra=None, purpose="optimizer adamw8bit", otherwise='use optimizer = "adamw"')
    # Installed, but broken: a package it imports is missing. The same install repairs it.
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import sdlab_test_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependency, match="needs half_installed, whose dependency "
                                                "sdlab_test_absent_dependency is not installed"):
        require("half_installed", extra="train", purpose="training")


def test_the_server_answers_500_for_a_package_its_installation_lacks():
    from sdlab.server.errors import status_of

    assert status_of(MissingDependency("x")) == 500
