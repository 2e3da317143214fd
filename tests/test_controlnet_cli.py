"""ControlNet on the command line: `sdlab generate --control ...` makes the image the Python API
makes with the same unit, `sdlab detect` the preprocessor's map; bad input is one line each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("cv2")

from sdlab.checkpoints.io import save_safetensors  # noqa: E402
from sdlab.cli import main  # noqa: E402
from sdlab.controlnet.preprocess import get_preprocessor  # noqa: E402
from sdlab.controlnet.units import ControlRequest  # noqa: E402
from sdlab.models.controlnet import ControlNetConfig  # noqa: E402

from .models.test_controlnet import random_controlnet  # noqa: E402
from .tiny import save_native, tiny_bundle, tiny_config  # noqa: E402

SIZE = 32


def control_image() -> Image.Image:
    """A shape whose edges canny finds."""
    image = Image.new("RGB", (48, 40), (20, 40, 200))
    ImageDraw.Draw(image).ellipse((8, 6, 36, 34), fill=(230, 30, 30))
    return image


def make_models(root: Path) -> Path:
    """A models folder as the web UI keeps it: a tiny SD1 checkpoint, a random ControlNet for it
    (the tiny VAE scales by 4: two stride-2 convs in the hint encoder), and an SDXL one."""
    (root / "Stable-diffusion").mkdir(parents=True)
    (root / "ControlNet").mkdir()
    bundle = tiny_bundle("sd1")
    save_native(bundle, root / "Stable-diffusion" / "tiny.safetensors")
    for name, unet in (("tiny_canny", bundle.config.unet), ("xl_canny", tiny_config("sdxl").unet)):
        net = random_controlnet(ControlNetConfig(unet, hint_block_channels=(16, 32, 64)))
        save_safetensors({"control_model." + k: v for k, v in net.state_dict().items()},
                         root / "ControlNet" / f"{name}.safetensors")
    return root / "Stable-diffusion" / "tiny.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = make_models(root)
    image = tmp_path_factory.mktemp("in") / "shape.png"
    control_image().save(image)
    return root, model, image


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_control_flags_make_the_python_api_image(setup, tmp_path, capsys):
    import sdlab

    root, model, image = setup
    out = tmp_path / "out.png"
    common = ["--steps", 3, "--seed", 5, "-W", SIZE, "-H", SIZE, "--models-dir", root, "-m", model]
    code, err = _run(capsys, "generate", "a red circle", *common, "-o", out,
                     "--control", "tiny_canny", "--control-image", image, "--control-module", "canny",
                     "--control-weight", 0.8, "--control-start", 0, "--control-end", 0.7, "--control-mode", "prompt",
                     "--control-resize", "fill", "--control-threshold-a", 50)
    assert code == 0, err
    unit = ControlRequest("tiny_canny", image=Image.open(image), module="canny", weight=0.8, guidance_end=0.7,
                          control_mode="My prompt is more important", resize_mode="Resize and Fill", threshold_a=50)
    pipe = sdlab.load(model, models_dir=root)
    (ours,) = pipe.txt2img("a red circle", steps=3, seed=5, width=SIZE, height=SIZE, controls=[unit])
    cli = Image.open(out)
    assert np.array_equal(np.asarray(cli.convert("RGB")), np.asarray(ours))
    assert cli.info["parameters"] == ours.info["parameters"]
    assert ('ControlNet 0: "Module: canny, Model: tiny_canny, Weight: 0.8, Resize Mode: Resize and Fill, '
            'Processor Res: -1, Threshold A: 50.0, Threshold B: -1.0') in ours.info["parameters"]


def test_detect_saves_the_preprocessor_map(setup, tmp_path, capsys):
    _, _, image = setup
    out = tmp_path / "map.png"
    code, err = _run(capsys, "detect", "canny", image, "-o", out, "--res", 64, "--threshold-a", 50)
    assert code == 0, err
    expected = get_preprocessor("canny")(Image.open(image).convert("RGB"), 64, 50, -1)
    assert np.array_equal(np.asarray(Image.open(out)), expected) and expected.max() == 255


def test_bad_control_input_is_one_line(setup, tmp_path, capsys):
    root, model, image = setup
    common = ["generate", "x", "--steps", 1, "-W", SIZE, "-H", SIZE, "--models-dir", root, "-m", model,
              "-o", tmp_path / "x.png"]
    with pytest.raises(SystemExit) as e:  # a unit flag with no --control before it: usage
        main([str(a) for a in [*common, "--control-weight", 0.5, "--control", "tiny_canny"]])
    assert e.value.code == 2 and "--control-weight must follow the --control MODEL" in capsys.readouterr().err
    for flags, words in (
            (["--control", "nothing", "--control-image", image], "ControlNet model 'nothing' not found"),
            (["--control", "tiny_canny", "--control-image", image, "--control-module", "edges"],
             "unknown ControlNet preprocessor (module) 'edges'"),
            (["--control", "tiny_canny"], "give --control-image"),
            (["--control", "tiny_canny", "--control-image", image, "--control-mode", "loud"], "unknown control mode"),
            (["--control", "xl_canny", "--control-image", image], "SDXL")):
        code, err = _run(capsys, *common, *flags)
        assert code == 1 and words in err and err.count("\n") == 1, (flags, err)
    code, err = _run(capsys, "detect", "depth", image)
    assert code == 1 and "needs the annotator file dpt_hybrid-midas-501f0c75.pt" in err
