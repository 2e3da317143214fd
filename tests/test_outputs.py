"""Saving images as the web UI saves them: folders, numbering, infotext, atomic writes."""

from __future__ import annotations

import datetime
from pathlib import Path

from PIL import Image

from sdlab.outputs import next_sequence_number, samples_folder, save_image


def test_samples_folders_are_the_web_uis():
    day = datetime.date(2024, 3, 9)
    assert samples_folder(Path("outputs"), "txt2img", day) == Path("outputs/txt2img-images/2024-03-09")
    for mode in ("img2img", "inpaint"):
        assert samples_folder(Path("outputs"), mode, day) == Path("outputs/img2img-images/2024-03-09")
    assert samples_folder(Path("o"), "txt2img").name == datetime.date.today().isoformat()


def test_numbering_goes_on_from_the_largest_number_in_the_folder(tmp_path):
    """The web UI's get_next_sequence_number: every file whose name starts with a number before
    its first '-' counts (a .txt beside an image too); other names do not."""
    assert next_sequence_number(tmp_path / "missing") == 0
    assert next_sequence_number(tmp_path) == 0
    for name in ("00003-12.png", "00010-5.png", "00012.txt", "grid-0099.png", "notes.txt", ".00050-1.png.x.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert next_sequence_number(tmp_path) == 13


def test_save_image_writes_the_png_with_its_infotext(tmp_path):
    folder = tmp_path / "txt2img-images" / "2024-03-09"
    image = Image.new("RGB", (16, 8), (10, 200, 30))
    text = "a red circle\nSteps: 20, Sampler: Euler a, Seed: 42, Size: 16x8"
    first = save_image(image, folder, 42, text)
    assert first == folder / "00000-42.png"
    (folder / "00001-43.png").write_bytes(b"")  # taken, and the largest number: the next goes after it
    second = save_image(image, folder, 43, None)
    assert second == folder / "00002-43.png"
    saved = Image.open(first)
    assert saved.format == "PNG" and saved.info["parameters"] == text and saved.tobytes() == image.tobytes()
    assert "parameters" not in Image.open(second).info
    assert sorted(p.name for p in folder.iterdir()) == ["00000-42.png", "00001-43.png", "00002-43.png"]
