"""Generated images keep their infotext when saved the plain way (`image.save("out.png")`),
in the chunk or EXIF field the web UI writes for each format, and stay ordinary PIL images."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdlab.infotext import InfotextImage, read_infotext, with_infotext
from sdlab.pipeline import Pipeline

from .tiny import tiny_bundle

TEXT = 'a red circle, "quoted"\nNegative prompt: blur\nSteps: 2, Sampler: Euler a, Seed: 7, Size: 32x32'


def _image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_pipeline_images_save_with_their_infotext(tmp_path):
    pipe = Pipeline(tiny_bundle("sd1"))
    (image,) = pipe.txt2img("a red circle", steps=1, seed=3, width=32, height=32)
    image.save(tmp_path / "out.png")
    saved = Image.open(tmp_path / "out.png")
    assert saved.info["parameters"] == image.info["parameters"] and "Seed: 3" in saved.info["parameters"]


@pytest.mark.parametrize("name", ["out.png", "out.PNG", "out.jpg", "out.jpeg", "out.webp"])
def test_saved_by_file_name(tmp_path, name):
    """PNG: the `parameters` chunk; JPEG and WebP: the EXIF UserComment (as piexif writes it for
    the web UI); each read back by `read_infotext`, unicode and newlines intact."""
    image = with_infotext(_image(), TEXT + ", Model: café")
    image.save(tmp_path / name)
    assert read_infotext(Image.open(tmp_path / name)) == TEXT + ", Model: café"


def test_saved_to_a_file_object_with_a_format():
    buffer = io.BytesIO()
    with_infotext(_image(), TEXT).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).info["parameters"] == TEXT


def test_pnginfo_given_by_the_caller_wins(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "mine")
    with_infotext(_image(), TEXT).save(tmp_path / "a.png", pnginfo=info)
    assert Image.open(tmp_path / "a.png").info["parameters"] == "mine"


def test_an_ordinary_pil_image_otherwise(tmp_path):
    """Same pixels as the image it wraps; what Pillow makes from it is a plain image (whose save
    drops the text, as Pillow's does); it pickles with its infotext."""
    plain = _image()
    image = with_infotext(plain, TEXT)
    assert isinstance(image, Image.Image) and image.size == (24, 16) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(plain)) and "parameters" not in plain.info
    for derived in (image.copy(), image.convert("L"), image.resize((12, 8))):
        assert type(derived) is Image.Image and derived.info["parameters"] == TEXT
    image.resize((12, 8)).save(tmp_path / "small.png")
    assert "parameters" not in Image.open(tmp_path / "small.png").info
    again = pickle.loads(pickle.dumps(image))
    assert isinstance(again, InfotextImage) and np.array_equal(np.asarray(again), np.asarray(plain))
    again.save(tmp_path / "again.png")
    assert Image.open(tmp_path / "again.png").info["parameters"] == TEXT
