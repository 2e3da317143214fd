"""Optional dependencies, imported through one function so that a missing one is a line that
says how to install it (the CLI exits with 2), never a ModuleNotFoundError traceback.

The extras are pyproject.toml's [project.optional-dependencies]: `serve` (fastapi, uvicorn),
`hub` (huggingface_hub), `train` (accelerate), `upscale` (spandrel), `controlnet` (opencv). A few features need a
package that no extra pulls in (bitsandbytes for the 8-bit optimizer); for those `extra` is None.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Literal

from .errors import MissingDependency

Extra = Literal["serve", "hub", "train", "upscale", "controlnet"]


def install_command(extra: Extra | None, package: str) -> str:
    """The pip command that installs `package`: through sdlab's extra when one has it."""
    if extra is None:
        return f"pip install {package}"
    # Both spellings, since sdlab is installed from PyPI by some and from a checkout by others.
    return f'pip install "sdlab[{extra}]" (in a source checkout: pip install -e ".[{extra}]")'


def require(module: str, *, extra: Extra | None, purpose: str, otherwise: str | None = None) -> ModuleType:
    """`importlib.import_module(module)`, or `MissingDependency` with the command that installs it.

    Args:
        module: what to import, e.g. "fastapi" or "accelerate.utils".
        extra: the sdlab extra that installs it; None for a package no extra pulls in.
        purpose: what needs it; the message starts with it ("sdlab serve", "training").
        otherwise: a way round it that needs no install, appended as ", or ...".
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        package = module.partition(".")[0]
        missing = e.name or package
        if missing == package or missing.startswith(package + "."):
            what = f"{package}, which is not installed"
        else:  # the package is there but one it imports is not: the same install repairs it
            what = f"{package}, whose dependency {missing} is not installed"
        tail = f", or {otherwise}" if otherwise else ""
        raise MissingDependency(f"{purpose} needs {what}: {install_command(extra, package)}{tail}") from None
