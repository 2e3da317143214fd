"""The ControlNet preprocessors against their definitions in the sd-webui-controlnet extension
(scripts/preprocessor/, scripts/utils.py: resize_image_with_pad), written out here with OpenCV,
and the registry against the extension's names, labels and slider defaults."""

import sys

import numpy as np
import pytest
from PIL import Image

from sdlab.controlnet import preprocess as pp
from sdlab.errors import MissingDependency, SdlabError

cv2 = pytest.importorskip("cv2")


def photo(h: int = 150, w: int = 100, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image with some edges (blocks of colour plus noise)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = np.kron(blocks, np.ones((25, 25, 1), dtype=np.uint8))[:h, :w].astype(np.int16)
    return (img + rng.integers(-20, 21, img.shape)).clip(0, 255).astype(np.uint8)


def extension_resize_with_pad(img: np.ndarray, res: int):
    """The extension's resize_image_with_pad, step by step."""
    h, w = img.shape[:2]
    k = res / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    resized = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad_h, pad_w = int(np.ceil(th / 64) * 64 - th), int(np.ceil(tw / 64) * 64 - tw)
    return np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge"), (th, tw)


@pytest.mark.parametrize("res, low, high", [(512, 100, 200), (96, 50, 120), (130, 1, 255)])
def test_canny_is_cv2_canny_with_the_extensions_steps(res, low, high):
    img = photo()
    padded, (th, tw) = extension_resize_with_pad(img, res)
    expected = cv2.cvtColor(cv2.Canny(padded, low, high)[:th, :tw], cv2.COLOR_GRAY2RGB)
    ours = pp.canny(img, res, low, high)
    assert ours.shape == (th, tw, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, expected)
    assert 0 < (ours > 0).mean() < 0.5  # edges found, not everything
    # Through the registry with the API's names, and from a PIL image.
    assert np.array_equal(pp.get_preprocessor("canny")(Image.fromarray(img), res, low, high), expected)


def test_api_values_out_of_range_or_minus_one_mean_the_defaults():
    img = photo()
    default = pp.canny(img)  # 512, 100, 200
    canny = pp.get_preprocessor("canny")
    assert np.array_equal(canny(img), default)
    assert np.array_equal(canny(img, -1, -1, -1), default)
    assert np.array_equal(canny(img, 5000, 0, 300), default)  # each outside its slider's range
    assert canny(img, 64).shape[:2] == (96, 64)


def test_resize_image_with_pad():
    img = photo(150, 100)
    padded, remove_pad = pp.resize_image_with_pad(img, 200)
    expected, (th, tw) = extension_resize_with_pad(img, 200)
    assert (th, tw) == (300, 200) and padded.shape == (320, 256, 3)
    assert np.array_equal(padded, expected)
    assert remove_pad(padded).shape == (300, 200, 3)


def test_invert_and_none_and_hwc3():
    img = photo()
    assert np.array_equal(pp.invert(img), 255 - img)
    assert np.array_equal(pp.none(img), img)
    grey = img[:, :, 0]
    assert np.array_equal(pp.invert(grey), 255 - np.stack([grey] * 3, axis=2))
    rgba = np.dstack([img, np.full(img.shape[:2], 0, np.uint8)])
    assert (pp.none(rgba) == 255).all()  # transparent: composited onto white, as the extension's HWC3
    with pytest.raises(SdlabError, match="8-bit"):
        pp.none(img.astype(np.float32))


def test_threshold():
    img = photo(128, 192)  # short side 128 = the resolution, width a multiple of 64: no resize, no pad
    out = pp.threshold(img, 128, 100)
    expected = np.where(img.min(axis=2) > 100, 255, 0).astype(np.uint8)
    assert np.array_equal(out, np.stack([expected] * 3, axis=2))
    assert np.array_equal(pp.get_preprocessor("threshold")(img, 128), pp.threshold(img, 128, 127))


def test_scribble_xdog():
    img = np.full((128, 128, 3), 255, np.uint8)
    img[60:64, 20:100] = 0  # a dark bar
    out = pp.scribble_xdog(img, 128, 32)
    x = img.astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2))
    expected = np.where(2 * (255 - dog.clip(0, 255).astype(np.uint8)) > 32, 255, 0)
    assert np.array_equal(out[:, :, 0], expected) and (out[:, :, 0] == out[:, :, 2]).all()
    assert out[62, 60].tolist() == [255, 255, 255] and not out[10:30].any()  # the bar, and nothing far from it
    assert not pp.scribble_xdog(np.full((64, 64, 3), 90, np.uint8), 64).any()  # flat: no scribbles


def test_tile_resample():
    img = photo(150, 100)
    assert np.array_equal(pp.tile_resample(img, 1.0), img)
    assert np.array_equal(pp.tile_resample(img, 1.05), img)  # below 1.1: unchanged
    out = pp.tile_resample(img, 2.5)
    assert np.array_equal(out, cv2.resize(img, (40, 60), interpolation=cv2.INTER_AREA))
    assert pp.get_preprocessor("tile_resample")(img, -1, 3.0).shape == (50, 33, 3)


def test_lineart_standard():
    img = np.full((128, 128, 3), 230, np.uint8)
    img[40:42, 10:120] = 30  # a dark line on a light page
    out = pp.lineart_standard(img, 128)
    x = img.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    intensity = intensity / max(16, np.median(intensity[intensity > 8])) * 127
    assert np.array_equal(out[:, :, 1], intensity.clip(0, 255).astype(np.uint8))
    assert out[41, 60, 0] > 100 and out[100, 60, 0] == 0
    assert not pp.lineart_standard(np.full((64, 64, 3), 200, np.uint8), 64).any()  # no lines: black, not nan


def test_blur_gaussian_color_and_shuffle():
    img = photo(128, 128)
    assert np.array_equal(pp.blur_gaussian(img, 128, 3.0), cv2.GaussianBlur(img, (0, 0), 3.0))
    grid = pp.color(img, 256)
    assert grid.shape == (256, 256, 3)
    blocks = grid.reshape(4, 64, 4, 64, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # constant over each 64-pixel block
    a, b = pp.shuffle(img, 128, seed=1), pp.shuffle(img, 128, seed=1)
    assert a.shape == img.shape and np.array_equal(a, b) and not np.array_equal(a, img)


def test_recolor():
    grey = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    lum = pp.recolor_luminance(grey)
    assert np.array_equal(lum[:, :, 0], cv2.cvtColor(grey, cv2.COLOR_BGR2LAB)[:, :, 0])
    assert np.array_equal(pp.recolor_intensity(grey)[:, :, 0], grey[:, :, 0])  # V of grey is the grey
    dark = pp.recolor_intensity(grey, 2.0)[0, :, 0].astype(int)
    assert np.abs(dark - ((np.arange(256) / 255.0) ** 2 * 255).astype(int)).max() <= 1


def test_inpaint_mask_to_control():
    img = photo(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 200
    rgba = pp.get_preprocessor("inpaint_only")(img, mask=mask)
    assert rgba.shape == (64, 64, 4)
    assert np.array_equal(rgba[:, :, :3], img) and set(np.unique(rgba[:, :, 3])) == {0, 255}
    assert np.array_equal(pp.inpaint(rgba), rgba)  # an RGBA image carries its own mask
    hint = pp.inpaint_hint(rgba)
    assert hint.dtype == np.float32 and (hint[15, 15] == -1).all()
    assert np.allclose(hint[50, 50], img[50, 50] / 255.0)
    with pytest.raises(SdlabError, match="mask"):
        pp.get_preprocessor("inpaint")(img)
    with pytest.raises(SdlabError, match="size"):
        pp.inpaint(img, mask[:32])


def test_registry_names_order_and_details():
    names = pp.module_names()
    assert names[0] == "none" and len(names) == len(set(names))
    assert {"canny", "invert", "threshold", "scribble_xdog", "tile_resample", "lineart_standard", "blur_gaussian",
            "shuffle", "inpaint_only", "depth", "openpose_full", "hed", "mlsd"} <= set(names)
    assert names.index("canny") < names.index("blur_gaussian")  # priority 100 before 0, as the extension
    labels = pp.module_names(alias_names=True)
    assert "invert (from white bg & black line)" in labels and "depth_midas" in labels
    assert pp.get_preprocessor("depth_midas") is pp.get_preprocessor("depth")
    detail = pp.module_detail()
    assert detail["canny"]["sliders"][1:] == [
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]
    assert detail["invert"]["sliders"] == []  # no resolution: invert works at the input's size
    assert detail["threshold"]["sliders"][1]["value"] == 127
    assert detail["tile_resample"]["sliders"][1]["name"] == "Down Sampling Rate"
    with pytest.raises(SdlabError, match="unknown ControlNet preprocessor"):
        pp.get_preprocessor("cany")


@pytest.mark.parametrize("name, file", [("depth", "dpt_hybrid-midas-501f0c75.pt"), ("openpose_full", "facenet.pth"),
                                        ("hed", "ControlNetHED.pth"), ("mlsd", "mlsd_large_512_fp32.pth")])
def test_annotator_preprocessors_say_what_they_need(name, file):
    p = pp.get_preprocessor(name)
    assert not p.available
    with pytest.raises(SdlabError, match=f"needs the annotator file .*{file}.* in models/ControlNet/annotators"):
        p(photo())


def test_without_opencv_the_message_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now fails as if it were not installed
    with pytest.raises(MissingDependency, match=r"sdlab\[controlnet\]"):
        pp.canny(photo())
    assert np.array_equal(pp.invert(photo()), 255 - photo())  # numpy-only operations need no OpenCV
