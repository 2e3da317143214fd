"""A synthetic captioned data set: coloured shapes on coloured backgrounds.

The demo model is trained on it, so it has to be learnable by a tiny network in
minutes and checkable without a human: every caption names a shape, a
foreground colour and a background colour from small fixed vocabularies, and
`classify_colours` reads the two colours back from any image (generated ones
included) so an evaluation can count how often "a red circle on a blue
background" really comes out red on blue.

Image `i` depends only on `(seed, i)`, so a larger data set starts with the
same images as a smaller one made from the same seed.
"""

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from sdlab.checkpoints.io import atomic_path

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")

# Far apart in RGB so that nearest-colour classification is unambiguous even
# for the slightly-off colours a small model produces.
PALETTE: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 170, 50),
        "blue": (30, 70, 220),
        "yellow": (245, 220, 40),
        "purple": (140, 50, 180),
        "orange": (250, 140, 20),
        "white": (245, 245, 245),
        "black": (20, 20, 20),
    }
)
COLOURS: tuple[str, ...] = tuple(PALETTE)

# Captions left out of the data set when `hold_out=True` (the demo recipe does this), so an
# evaluation can ask for combinations the model never saw. Every shape, and every colour as
# both foreground and background, still appears in training in other combinations.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("circle", "red", "green"), ("circle", "white", "purple"), ("circle", "orange", "black"),
        ("square", "blue", "yellow"), ("square", "purple", "white"), ("square", "black", "orange"),
        ("triangle", "green", "red"), ("triangle", "yellow", "blue"), ("triangle", "white", "black"),
        ("star", "orange", "purple"), ("star", "red", "black"), ("star", "white", "green"),
        ("diamond", "purple", "yellow"), ("diamond", "black", "blue"), ("diamond", "green", "white"),
    }
)

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: exact area anti-aliasing
_PROGRESS_MIN = 200  # below this many images a progress bar is just noise


def caption_for(shape: str, colour: str, background: str) -> str:
    """The caption of one image, e.g. "a red circle on a blue background", "an orange star on a black background"."""
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius `r`, rotated by `angle` radians."""
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "diamond":
        # Taller than wide (as the card suit) so it never looks like a rotated square.
        pts = [(0.0, 0.65 * r), (math.pi / 2, r), (math.pi, 0.65 * r), (3 * math.pi / 2, r)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return [(cx + rr * math.cos(a + angle), cy + rr * math.sin(a + angle)) for a, rr in pts]


def render_shape(
    shape: str,
    colour: str,
    background: str,
    size: int,
    *,
    center: tuple[float, float],
    radius: float,
    angle: float = 0.0,
) -> Image.Image:
    """Draw one anti-aliased shape; `center` (x, y) and `radius` are in output pixels."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (size * s, size * s), PALETTE[background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = center[0] * s, center[1] * s, radius * s
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=PALETTE[colour])
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=PALETTE[colour])
    return img.resize((size, size), Image.Resampling.BOX)


def _sample(seed: int, index: int, size: int, hold_out: bool = False) -> tuple[str, str, str, dict]:
    rng = np.random.default_rng((seed, index))
    while True:  # draw again (from the same stream) while the combination is held out
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour, background = rng.choice(len(COLOURS), size=2, replace=False)
        if not (hold_out and (shape, COLOURS[colour], COLOURS[background]) in HELD_OUT):
            break
    radius = size * rng.uniform(0.18, 0.38)
    margin = radius + 0.06 * size  # keep the shape off the border, which classify_colours reads as background
    cx, cy = rng.uniform(margin, size - margin, size=2)
    # Small tilts only: a square turned 45 degrees would be a diamond.
    angle = math.radians(rng.uniform(-15, 15)) if shape != "circle" else 0.0
    return shape, COLOURS[colour], COLOURS[background], dict(center=(cx, cy), radius=radius, angle=angle)


def make_shapes_dataset(
    out_dir: Path,
    count: int,
    size: int = 64,
    seed: int = 0,
    layout: Literal["kohya", "jsonl", "parquet"] = "kohya",
    hold_out: bool = False,
) -> list[Path]:
    """Write `count` captioned images of coloured shapes to `out_dir`.

    Args:
        out_dir: folder to write into (created if missing).
        count: number of images.
        size: side of the square images in pixels.
        seed: images are a pure function of `(seed, index)`.
        layout: "kohya" writes `000000.png` + `000000.txt`; "jsonl" writes the images and one
            `metadata.jsonl` with `file_name` and `text` (Hugging Face imagefolder); "parquet" one
            `data/train-00000-of-00001.parquet` as the Hub publishes data sets (an `image` column
            of the `datasets` Image feature's PNG bytes and a `text` column; needs pyarrow).
        hold_out: leave the combinations in `HELD_OUT` out (images that would have drawn one
            draw another combination instead; the others are unchanged).

    Returns:
        The image paths, in index order (parquet: the one file).
    """
    if layout not in ("kohya", "jsonl", "parquet"):
        raise ValueError(f"layout must be 'kohya', 'jsonl' or 'parquet', got {layout!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if layout == "parquet":
        import io

        from .hf_dataset import write_parquet

        def rows():
            for i in tqdm(range(count), desc="shapes", unit="img", disable=count < _PROGRESS_MIN):
                shape, colour, background, geometry = _sample(seed, i, size, hold_out)
                buf = io.BytesIO()
                render_shape(shape, colour, background, size, **geometry).save(buf, format="PNG")
                yield buf.getvalue(), f"{i:06d}.png", caption_for(shape, colour, background)

        path = out_dir / "data" / "train-00000-of-00001.parquet"
        write_parquet(rows(), path)
        logger.info("wrote %d shape images to %s", count, path)
        return [path]
    paths: list[Path] = []
    records: list[dict[str, str]] = []
    for i in tqdm(range(count), desc="shapes", unit="img", disable=count < _PROGRESS_MIN):
        shape, colour, background, geometry = _sample(seed, i, size, hold_out)
        caption = caption_for(shape, colour, background)
        path = out_dir / f"{i:06d}.png"
        with atomic_path(path) as tmp:
            render_shape(shape, colour, background, size, **geometry).save(tmp, format="PNG")
        if layout == "kohya":
            with atomic_path(path.with_suffix(".txt")) as tmp:
                tmp.write_text(caption + "\n", encoding="utf-8")
        else:
            records.append({"file_name": path.name, "text": caption})
        paths.append(path)
    if layout == "jsonl":
        with atomic_path(out_dir / "metadata.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    logger.info("wrote %d shape images to %s (%s layout)", count, out_dir, layout)
    return paths


def _nearest(rgb: np.ndarray, exclude: str | None = None) -> str:
    names = [n for n in COLOURS if n != exclude]
    ref = np.array([PALETTE[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((ref - rgb) ** 2).sum(axis=1)))]


def classify_colours(image: Image.Image | np.ndarray) -> tuple[str, str]:
    """Name the (foreground, background) colours of a shapes image.

    The background is the nearest named colour to the median border pixel. The
    foreground is the nearest other named colour to the median of the pixels that
    differ clearly from the measured background (so anti-aliased edge pixels,
    which are blends of the two, do not pull it towards the background).

    Args:
        image: a PIL image or an (H, W, 3) uint8 array.
    """
    arr, bg_rgb, fg_mask, dist = _split(image)
    background = _nearest(bg_rgb)
    fg_rgb = np.median(arr[fg_mask], axis=0) if fg_mask.any() else arr.reshape(-1, 3)[dist.argmax()]
    return _nearest(fg_rgb, exclude=background), background


def _split(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pixels as float (H, W, 3), background RGB = median border pixel, foreground mask = pixels
    clearly far from it, each pixel's distance from it)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(((arr - bg_rgb) ** 2).sum(axis=-1))
    return arr, bg_rgb, dist > max(40.0, 0.5 * dist.max()), dist


def classify_shape(image: Image.Image | np.ndarray) -> str:
    """Name the shape in a shapes image from the geometry of its foreground pixels.

    Three scale-free measures of the foreground mask (pixels far from the border's
    median colour) separate the five shapes of `SHAPES`:

    - elongation (smaller / larger eigenvalue of the second moments): the diamond is
      0.65 as wide as tall (about 0.42); the regular shapes are isotropic (1.0);
    - solidity (area / convex-hull area): the star's is about 0.56, the convex shapes' 1.0;
    - roundness (area / the circle through the farthest pixel): circle 1.0, square 0.64,
      triangle 0.41.
    """
    ys, xs = np.nonzero(_split(image)[2])
    if len(xs) < 6:
        return "circle"  # nothing drawn: any answer is as wrong as another
    pts = np.stack([xs, ys], axis=1).astype(np.float64) + 0.5
    centred = pts - pts.mean(axis=0)
    eig = np.linalg.eigvalsh(np.cov(centred.T))
    if eig[0] / eig[1] < 0.65:
        return "diamond"
    # Each pixel is a unit square: the hull of the pixel corners, and the farthest corner.
    corners = (pts[:, None, :] + np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])).reshape(-1, 2)
    area = float(len(pts))
    if area / _hull_area(corners) < 0.8:
        return "star"
    r_max = np.sqrt(((corners - pts.mean(axis=0)) ** 2).sum(axis=1)).max()
    roundness = area / (math.pi * r_max**2)
    return "circle" if roundness > 0.8 else "square" if roundness > 0.52 else "triangle"


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out: list[tuple[float, float]] = []
        for p in seq:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = np.array(half(pts)[:-1] + half(pts[::-1])[:-1])
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
