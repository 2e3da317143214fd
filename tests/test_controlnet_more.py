"""ControlNet beyond one pass: the hires fix's second pass guided too (against diffusers' ControlNet
txt2img, the web UI's latent upscale and diffusers' ControlNet img2img at the hires size), the map
refitted to the hires size and canny made soft there; `sdlab generate --from` replaying the
`ControlNet N` lines; the extension's infotext format; and the extension's high-quality resize of
binary edge maps (re-thresholded and thinned), checked against the same operations done by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

cv2 = pytest.importorskip("cv2")

from sdlab.checkpoints.io import save_safetensors  # noqa: E402
from sdlab.checkpoints.loader import load_bundle  # noqa: E402
from sdlab.cli import main  # noqa: E402
from sdlab.controlnet.apply import (ControlUnit, controlled, for_hires, high_quality_resize,  # noqa: E402
                                    hint_tensor, resize_hint)
from sdlab.controlnet.units import ControlRequest, infotext_line, parse_infotext_line  # noqa: E402
from sdlab.errors import SdlabError  # noqa: E402
from sdlab.infotext import parse_infotext  # noqa: E402
from sdlab.models.controlnet import ControlNetConfig  # noqa: E402
from sdlab.models_dir import ModelsDir  # noqa: E402
from sdlab.pipeline import GenerationRequest, Pipeline  # noqa: E402

from .models.test_controlnet import random_controlnet  # noqa: E402
from .test_controlnet_cli import control_image, make_models  # noqa: E402
from .test_controlnet_pipeline import _diffusers_net  # noqa: E402
from .tiny import diffusers_folder, euler_karras  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 diffusers folder and a random ControlNet for it in models/ControlNet."""
    tmp = tmp_path_factory.mktemp("cn_more")
    _, folder = diffusers_folder(tmp, "sd1")
    bundle = load_bundle(folder, device="cpu")
    models = ModelsDir(tmp / "models")
    (models.root / "ControlNet").mkdir(parents=True)
    net = random_controlnet(ControlNetConfig(bundle.config.unet, hint_block_channels=(16, 32, 64)), seed=3)
    save_safetensors({"control_model." + k: v for k, v in net.state_dict().items()},
                     models.root / "ControlNet" / "tiny.safetensors")
    return folder, bundle, models, net


def test_hires_pass_is_controlled_as_txt2img_then_img2img(sd1):
    """A hires request with a unit = a ControlNet txt2img at 32x32 with the map fitted to 32x32,
    the web UI's "Latent" upscale, then a ControlNet img2img at 64x64 with the map fitted to
    64x64 (both in diffusers, 3 of int(3 / 0.5) = 6 steps), the unit's weight and end in both."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    folder, bundle, models, net = sd1
    source = np.asarray(control_image())  # 48x40: each size crops it differently
    maps = {size: Image.fromarray(resize_hint(source, size, size, "Crop and Resize")) for size in (32, 64)}
    controlnet = _diffusers_net(net)
    t2i = euler_karras(StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=controlnet,
                                                                         safety_checker=None))
    control = dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.8, guidance_scale=7.5)
    first = t2i(PROMPT, image=maps[32], num_inference_steps=4, height=32, width=32, output_type="latent",
                generator=torch.Generator("cpu").manual_seed(42), **control).images
    factor = bundle.config.vae.downsample_factor
    up = torch.nn.functional.interpolate(first, size=(64 // factor, 64 // factor), mode="bilinear", antialias=False)
    i2i = euler_karras(StableDiffusionControlNetImg2ImgPipeline(**t2i.components))

    def second(scale: float) -> torch.Tensor:
        return i2i(PROMPT, image=up, control_image=maps[64], strength=0.5, num_inference_steps=6, height=64,
                   width=64, output_type="latent", generator=torch.Generator("cpu").manual_seed(42),
                   **{**control, "controlnet_conditioning_scale": scale}).images

    pipe = Pipeline(bundle, models=models)

    def hires(hr_option: str) -> torch.Tensor:
        latents = []
        unit = ControlRequest("tiny", image=control_image(), weight=0.7, guidance_end=0.8, hr_option=hr_option)
        pipe.generate(GenerationRequest(PROMPT, steps=4, sampler="Euler", schedule="karras", cfg_scale=7.5, seed=42,
                                        width=32, height=32, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                                        hr_second_pass_steps=3, denoising_strength=0.5, controls=[unit]),
                      lambda p: latents.append(p.latents) if p.step == p.total else None)
        return latents[-1]

    ours, unguided = hires("Both"), second(0.0)
    assert ours.shape == (1, 4, 64 // factor, 64 // factor)
    error, effect = (ours - second(0.7)).abs().max().item(), (ours - unguided).abs().max().item()
    print(f"hires + ControlNet vs diffusers: {error:.2e}; the second pass's control moves the latent {effect:.3f}")
    assert error < 5e-4  # latents of magnitude ~30 (measured 2.7e-5: fp32 rounding of another summation order)
    assert effect > 10 * 5e-4  # the second pass is guided, well beyond that
    # The extension's hr_option "Low res only": the same first pass, an unguided second one.
    assert (hires("Low res only") - unguided).abs().max().item() < 5e-4


def test_for_hires_refits_the_detected_map_and_softens_canny(sd1):
    net = sd1[3]
    detected = np.zeros((40, 48, 3), np.uint8)
    detected[10:30, 12:36] = (200, 30, 30)
    detected[0] = (10, 10, 10)
    for mode in ("Just Resize", "Crop and Resize", "Resize and Fill"):
        unit = ControlUnit(net, hint_tensor(resize_hint(detected, 32, 32, mode)), 0.5, module="none",
                           detected=detected, resize_mode=mode)
        hr = for_hires(unit, 64, 48)
        assert torch.equal(hr.hint, hint_tensor(resize_hint(detected, 64, 48, mode)))
        assert hr.mode == "Balanced" and hr.weight == 0.5
    canny = ControlUnit(net, torch.zeros(1, 3, 32, 32), module="canny", detected=detected)
    assert for_hires(canny, 64, 64).mode == "My prompt is more important"  # the extension forces soft weights
    strong = ControlUnit(net, torch.zeros(1, 3, 32, 32), module="canny", mode="ControlNet is more important")
    assert for_hires(strong, 64, 64).mode == "ControlNet is more important"
    assert for_hires(strong, 64, 64).hint.shape == (1, 3, 64, 64)  # a ready-made hint is resized itself
    # hr_option "High res only": no guidance in the first pass, a unit like any other in the second.
    later = ControlUnit(net, torch.zeros(1, 3, 32, 32), hr_option="High res only")
    model = object()  # controlled() returns the model itself when no unit guides this pass
    assert controlled(model, [later], torch.tensor([1.0, 0.0])) is model
    assert for_hires(later, 64, 64).hr_option == "Both"


# The value the extension writes for a canny unit (internal_controlnet/args.py `serialize`: each
# infotext field's name capitalised word by word, its value as str(), joined by ", ").
EXTENSION_LINE = ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, "
                  "Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, "
                  "Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced")


def test_infotext_line_reads_and_writes_the_extensions_format():
    fields = parse_infotext_line(EXTENSION_LINE)
    assert fields == {"module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", "weight": 1.0,
                      "resize_mode": "Crop and Resize", "processor_res": 512.0, "threshold_a": 100.0,
                      "threshold_b": 200.0, "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False,
                      "control_mode": "Balanced"}
    assert infotext_line(ControlRequest(**fields)) == EXTENSION_LINE
    with pytest.raises(SdlabError, match="ControlNet 2 has 'Loud: yes'"):
        parse_infotext_line(EXTENSION_LINE + ", Loud: yes", "ControlNet 2")
    with pytest.raises(SdlabError, match="not a number"):
        parse_infotext_line("Model: x, Weight: heavy")


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_from_replays_the_controlnet_lines(tmp_path, capsys):
    root = tmp_path / "models"
    model = make_models(root)
    image = tmp_path / "shape.png"
    control_image().save(image)
    common = ["--models-dir", root, "-m", model]
    first = tmp_path / "first.png"
    code, err = _run(capsys, "generate", "a red circle", "--steps", 2, "--seed", 5, "-W", 32, "-H", 32, *common,
                     "-o", first, "--control", "tiny_canny", "--control-image", image, "--control-module", "canny",
                     "--control-weight", 0.8, "--control-end", 0.7, "--control-mode", "prompt",
                     "--control-resize", "fill", "--control-pixel-perfect")
    assert code == 0, err
    text = Image.open(first).info["parameters"]
    assert "Pixel Perfect: True, Control Mode: My prompt is more important" in parse_infotext(text)["ControlNet 0"]

    again = tmp_path / "again.png"
    code, err = _run(capsys, "generate", "--from", first, *common, "--control-image", image, "-o", again)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(Image.open(first).convert("RGB")))
    assert Image.open(again).info["parameters"] == text

    code, err = _run(capsys, "generate", "--from", first, *common, "-o", tmp_path / "x.png")
    assert code == 1 and err.count("\n") == 1
    assert "ControlNet 0 (canny, model tiny_canny): give its control image again with --control-image" in err
    code, err = _run(capsys, "generate", "--from", first, *common, "--control-image", image, "--control-image",
                     image, "-o", tmp_path / "x.png")
    assert code == 1 and "2 --control-image given but the PNG's infotext has 1 ControlNet line" in err
    code, err = _run(capsys, "generate", "x", *common, "--control-image", image, "-o", tmp_path / "x.png")
    assert code == 2 and "--control-image without --control" in err


# ---------------------------------------------------------------------------------------------
# The extension's high-quality resize, against the operations written out here


def _hit_or_miss(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Where every 1 of the 3x3 kernel sits on white and every -1 on black (0: either)."""
    padded = np.pad(x > 127, 1)
    hit = np.ones(x.shape, bool)
    for dy in range(3):
        for dx in range(3):
            window = padded[dy:dy + x.shape[0], dx:dx + x.shape[1]]
            if kernel[dy, dx] == 1:
                hit &= window
            elif kernel[dy, dx] == -1:
                hit &= ~window
    return hit


def _thin_by_hand(x: np.ndarray, prune: bool) -> np.ndarray:
    def rotations(kernels):
        return [np.rot90(np.array(k), turn) for turn in range(4) for k in kernels]

    thinning = rotations([[[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]]])
    pruning = rotations([[[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]])
    y = x.copy()

    def one_round(kernels) -> bool:
        changed = False
        for k in kernels:
            hits = _hit_or_miss(y, k)
            changed |= bool(hits.any())
            y[hits] = 0
        return changed

    for _ in range(32):
        if not one_round(thinning):
            break
    if prune:
        one_round(pruning)
    return y


def _nms_by_hand(x: np.ndarray) -> np.ndarray:
    """Keep a pixel that is >= both neighbours along one of the four directions."""
    p = np.pad(x.astype(np.int32), 1)
    h, w = x.shape
    at = lambda dy, dx: p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # noqa: E731
    keep = np.zeros(x.shape, bool)
    for (ay, ax), (by, bx) in (((0, -1), (0, 1)), ((-1, 0), (1, 0)), ((-1, -1), (1, 1)), ((-1, 1), (1, -1))):
        keep |= (x >= at(ay, ax)) & (x >= at(by, bx))
    return np.where(keep, x, 0).astype(np.uint8)


def _otsu_by_hand(x: np.ndarray) -> np.ndarray:
    """Otsu's threshold: the t that maximises the between-class variance of `<= t` and `> t`."""
    hist = np.bincount(x.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    best, best_t = -1.0, 0
    for t in range(256):
        w0, w1 = hist[:t + 1].sum(), hist[t + 1:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (hist[:t + 1] * levels[:t + 1]).sum() / w0
        m1 = (hist[t + 1:] * levels[t + 1:]).sum() / w1
        if w0 * w1 * (m0 - m1) ** 2 > best:
            best, best_t = w0 * w1 * (m0 - m1) ** 2, t
    return np.where(x > best_t, 255, 0).astype(np.uint8)


def _edge_map(size=(40, 48), width: int = 1) -> np.ndarray:
    """A white-on-black drawing: an ellipse and a diagonal line, `width` pixels wide."""
    image = Image.new("RGB", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 5, 30, 33), outline=(255, 255, 255), width=width)
    draw.line((28, 4, 44, 34), fill=(255, 255, 255), width=width)
    return np.asarray(image).copy()


@pytest.mark.parametrize("size", [(96, 80), (30, 25)])  # grown (thinned, spurs pruned) and shrunk (not pruned)
def test_one_pixel_edges_are_thinned_after_resizing(size):
    edges = _edge_map()
    resized = cv2.resize(edges, size, interpolation=cv2.INTER_CUBIC if size[0] > 48 else cv2.INTER_AREA)
    grey = np.mean(resized.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    expected = _thin_by_hand(_otsu_by_hand(_nms_by_hand(grey)), prune=size[0] > 48)
    ours = high_quality_resize(edges, size)
    assert ours.shape == (size[1], size[0], 3) and (ours[..., 0] == ours[..., 2]).all()
    assert np.array_equal(ours[..., 0], expected)
    assert set(np.unique(ours)) == {0, 255}
    # Thin: no 2x2 block is all white, where the plainly resized map has many.
    white = ours[..., 0] > 127
    assert not (white[:-1, :-1] & white[1:, :-1] & white[:-1, 1:] & white[1:, 1:]).any()


def test_thick_binary_maps_are_only_rethresholded_and_few_colours_stay_nearest():
    thick = _edge_map(width=5)
    ours = high_quality_resize(thick, (96, 80))
    grey = np.mean(cv2.resize(thick, (96, 80), interpolation=cv2.INTER_CUBIC).astype(np.float32), axis=2)
    assert np.array_equal(ours[..., 0], _otsu_by_hand(grey.clip(0, 255).astype(np.uint8)))
    segments = np.zeros((40, 48, 3), np.uint8)
    segments[:, 16:] = (10, 200, 30)
    segments[20:, :] = (120, 120, 250)
    assert np.array_equal(high_quality_resize(segments, (96, 80)), cv2.resize(segments, (96, 80),
                                                                               interpolation=cv2.INTER_NEAREST))


def test_inpaint_maps_keep_their_mask_and_become_minus_one():
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (40, 48, 3))
    rgba[10:20, 10:30, 3] = 255
    fitted = resize_hint(rgba, 96, 80, "Just Resize")
    assert fitted.shape == (80, 96, 4) and set(np.unique(fitted[..., 3])) == {0, 255}
    hint = hint_tensor(fitted)
    assert hint.shape == (1, 3, 80, 96)
    assert (hint[0, :, fitted[..., 3] == 255] == -1).all() and hint.min() == -1
