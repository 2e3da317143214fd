"""The built-in demo model (src/sdlab/demo/README.md): where it is, and `demo`, the name that
stands for it wherever a model is named. Its infotext and the server's model list call it
`demo`, so the same word works in `-m`, `sdlab info`, `sdlab serve --model` and `sdlab.load`."""

from __future__ import annotations

from pathlib import Path

DEMO_NAME = "demo"


def demo_model_path() -> Path:
    """The tiny demo model shipped inside the package (trained by `sdlab train` on shapes)."""
    from importlib import resources

    return Path(str(resources.files("sdlab") / "demo" / "demo.safetensors"))


def builtin_model(name: str | Path) -> Path | None:
    """The demo model's file when `name` is `demo` and no file or folder of that name is here
    (a path the user has wins over the built-in name); else None."""
    if str(name) != DEMO_NAME or Path(name).exists():
        return None
    return demo_model_path()
