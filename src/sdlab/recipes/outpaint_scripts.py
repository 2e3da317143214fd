"""The web UI's two img2img outpainting scripts as recipes over ordinary inpaint requests
(`recipes/outpaint.py` is sdlab's own one-request outpainting, ComfyUI's way):

- "Poor man's outpainting" (A1111 1.10 `scripts/poor_mans_outpainting.py`): the image on a black
  canvas grown by `pixels` on the chosen sides and rounded up to a multiple of 64 (the extra split
  between opposite sides in proportion), a mask over the new area inset `mask_blur * 2` into it and
  a latent mask inset `mask_blur // 2`; the canvas cut into tiles of the request's size that
  overlap by `pixels` (`images.split_grid`), each tile that reaches the new area inpainted (seed + 1
  per tile, mask blur `mask_blur * 2`, "fill" filling the new area with the blurred colours around
  it first), and the tiles joined again with linear blends over the overlaps
  (`images.combine_grid`): one image.
- "Outpainting mk2" (`scripts/outpainting_mk_2.py`): one side at a time (left, right, up, down),
  each a canvas rounded up to a multiple of 64 whose new area starts as the script's matched noise
  (`matched_noise`: noise shaped in the Fourier domain by the image's spectrum, from a generator
  seeded 0, its histogram matched to the image's), a strip of at most the request's size at that
  side inpainted from the original content (mask blur `mask_blur * 4`), pasted back and cropped to
  the grown size. Batch size images, each from seed + n; the grid first when there are several.

Where sdlab differs: the inpainting is sdlab's (`recipes/webui.py`); "Masked content" 2 and 3
(latent noise / nothing) are refused, as for any inpaint request; mk2 blurs its mask evenly where
the web UI blurs only along the expanded axis (the same mask, except within the blur radius of
the 64-pixel rounding band the script crops away); the web UI's batch count repeats mk2 with the
same seeds, which makes the same images again, so they are made once and repeated.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from ..errors import SdlabError
from ..request import MAX_SEED, GenerationRequest, GenerationResult, Interrupted
from .scripts import Generate, RequestsPlan, ScriptOutput
from .xyz import image_grid

__all__ = ["DIRECTIONS", "MK2_TITLE", "POOR_MANS_TITLE", "Mk2Plan", "OutpaintingMk2", "PoorMansOutpainting",
           "PoorMansPlan", "TileGrid", "combine_grid", "masked_fill", "match_histograms", "matched_noise", "plan_mk2",
           "plan_poor_mans", "split_grid"]

POOR_MANS_TITLE = "Poor man's outpainting"
MK2_TITLE = "Outpainting mk2"
DIRECTIONS = ("left", "right", "up", "down")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def _directions(direction: Sequence[str], script: str) -> tuple[str, ...]:
    if isinstance(direction, str):
        direction = [direction]
    bad = [d for d in direction if d not in DIRECTIONS]
    if bad:
        raise SdlabError(f"{script}: unknown direction {bad[0]!r}; choose from {', '.join(DIRECTIONS)}")
    if not direction:
        raise SdlabError(f"{script}: no direction to outpaint; give one or more of {', '.join(DIRECTIONS)}")
    return tuple(direction)


def _check_pixels(pixels: int, script: str) -> None:
    if not 8 <= pixels <= 256 or pixels % 8:
        raise SdlabError(f"{script}: pixels to expand {pixels} is not a multiple of 8 in 8-256")


def _fixed_seeds(req: GenerationRequest) -> tuple[int, int]:
    """The web UI's fix_seed on the first request: one seed and variation seed for the script."""
    seed = random.randrange(MAX_SEED) if req.seed is None or req.seed < 0 else int(req.seed)
    subseed = random.randrange(MAX_SEED) if req.subseed is None or req.subseed < 0 else int(req.subseed)
    return seed, subseed


def _canvas_sides(w: int, h: int, pixels: int, direction: tuple[str, ...]) -> tuple[int, int, int, int, int, int]:
    """(left, right, up, down, target_w, target_h): both scripts grow the canvas to a multiple of
    64 and share the growth between opposite sides in proportion."""
    left, right = (pixels if d in direction else 0 for d in ("left", "right"))
    up, down = (pixels if d in direction else 0 for d in ("up", "down"))
    target_w = math.ceil((w + left + right) / 64) * 64
    target_h = math.ceil((h + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - w) // (left + right)
    if right > 0:
        right = target_w - w - left
    if up > 0:
        up = up * (target_h - h) // (up + down)
    if down > 0:
        down = target_h - h - up
    return left, right, up, down, target_w, target_h


def _size(req: GenerationRequest) -> tuple[int, int]:
    w = req.width or max(8, req.init_image.width // 8 * 8)
    h = req.height or max(8, req.init_image.height // 8 * 8)
    return w, h


# -- the web UI's tiles (modules/images.py) ------------------------------------------------------

@dataclass
class TileGrid:
    """`images.split_grid`'s Grid: rows of (y, h, [[x, w, tile], ...])."""

    tiles: list[list]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> TileGrid:
    """Tiles of `tile_w` x `tile_h` that cover `image`, overlapping by at least `overlap`, spread
    evenly, the last ones flush with the right and bottom edges."""
    w, h = image.size
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = TileGrid([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        row_images = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            row_images.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        grid.tiles.append([y, tile_h, row_images])
    return grid


def combine_grid(grid: TileGrid) -> Image.Image:
    """The tiles joined again: each overlap a linear blend from the tile before to this one."""
    def ramp(r: np.ndarray) -> Image.Image:
        return Image.fromarray((r * 255 / grid.overlap).astype(np.uint8), "L")

    mask_w = ramp(np.arange(grid.overlap, dtype=np.float32).reshape((1, grid.overlap)).repeat(grid.tile_h, axis=0))
    mask_h = ramp(np.arange(grid.overlap, dtype=np.float32).reshape((grid.overlap, 1)).repeat(grid.image_w, axis=1))
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, row in grid.tiles:
        combined_row = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0:
                combined_row.paste(tile, (0, 0))
                continue
            combined_row.paste(tile.crop((0, 0, grid.overlap, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((grid.overlap, 0, w, h)), (x + grid.overlap, 0))
        if y == 0:
            combined.paste(combined_row, (0, 0))
            continue
        combined.paste(combined_row.crop((0, 0, combined_row.width, grid.overlap)), (0, y), mask=mask_h)
        combined.paste(combined_row.crop((0, grid.overlap, combined_row.width, h)), (0, y + grid.overlap))
    return combined


def masked_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The web UI's "fill" masked content (`modules/masking.py` `fill`): the masked area (white)
    filled with the colours around it, blurred ever less (radius 256 down to 0)."""
    image_mod = Image.new("RGBA", image.size)
    image_masked = Image.new("RGBa", image.size)
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


# -- Poor man's outpainting -----------------------------------------------------------------------

@dataclass(frozen=True)
class PoorMansOutpainting:
    """The script's arguments (its `run` signature), with its defaults."""

    pixels: int = 128  # "Pixels to expand", 8-256 step 8
    mask_blur: int = 4  # "Mask blur", 0-64
    inpainting_fill: int = 0  # "Masked content": 0 fill, 1 original (2, 3 refused)
    direction: tuple[str, ...] = DIRECTIONS  # "Outpainting direction"

    def __post_init__(self):
        object.__setattr__(self, "direction", _directions(self.direction, POOR_MANS_TITLE))
        _check_pixels(self.pixels, POOR_MANS_TITLE)
        if not 0 <= self.mask_blur <= 64:
            raise SdlabError(f"{POOR_MANS_TITLE}: mask blur {self.mask_blur} is outside 0-64")
        if self.inpainting_fill not in (0, 1):
            name = MASKED_CONTENT[self.inpainting_fill] if self.inpainting_fill in (2, 3) else self.inpainting_fill
            raise SdlabError(f"{POOR_MANS_TITLE}: masked content {name!r} is not implemented by sdlab; send 0 (fill) "
                             "or 1 (original)")


@dataclass
class PoorMansPlan(RequestsPlan):
    grid: TileGrid
    work: list[tuple[int, int]]  # (row, column) of each tile that is inpainted, in order
    requests: list[GenerationRequest]

    def run(self, generate: Generate) -> ScriptOutput:
        results, interrupted = self.run_requests(generate, f"{POOR_MANS_TITLE}: interrupted before the first tile")
        grid = self.grid
        tiles = [[[x, w, tile] for x, w, tile in row] for _, _, row in grid.tiles]
        for n, (r, c) in enumerate(self.work):
            # A tile that did not run is black, as the web UI leaves it.
            tiles[r][c][2] = results[n].images[0] if n < len(results) else Image.new("RGB", (grid.tile_w, grid.tile_h))
        combined = combine_grid(TileGrid([[y, h, row] for (y, h, _), row in zip(grid.tiles, tiles)], grid.tile_w,
                                         grid.tile_h, grid.image_w, grid.image_h, grid.overlap))
        info = results[0].infotexts[0]
        from ..infotext import with_infotext

        return ScriptOutput([with_infotext(combined, info)], [info], results, 0, interrupted,
                            [results[0].request.prompt], intermediate=True)


def plan_poor_mans(req: GenerationRequest, options: PoorMansOutpainting = PoorMansOutpainting()) -> PoorMansPlan:
    """The tiles of the grown canvas that reach the new area, each an inpaint request."""
    if req.init_image is None:
        raise SdlabError(f"{POOR_MANS_TITLE} works on img2img: give an init image")
    init = req.init_image.convert("RGB")
    tile_w, tile_h = _size(req)
    if options.pixels >= min(tile_w, tile_h):
        raise SdlabError(f"{POOR_MANS_TITLE}: pixels to expand ({options.pixels}) must be smaller than the width "
                         f"and height ({tile_w}x{tile_h}), which are the tiles' size")
    left, right, up, down, target_w, target_h = _canvas_sides(init.width, init.height, options.pixels,
                                                              options.direction)
    if tile_w > target_w or tile_h > target_h:
        raise SdlabError(f"{POOR_MANS_TITLE}: the tiles ({tile_w}x{tile_h}, the width and height) are larger than "
                         f"the grown image ({target_w}x{target_h}); send a smaller width and height")
    blur = options.mask_blur
    img = Image.new("RGB", (target_w, target_h))
    img.paste(init, (left, up))
    mask = Image.new("L", img.size, "white")
    ImageDraw.Draw(mask).rectangle((left + (blur * 2 if left > 0 else 0), up + (blur * 2 if up > 0 else 0),
                                    target_w - right - (blur * 2 if right > 0 else 0),
                                    target_h - down - (blur * 2 if down > 0 else 0)), fill="black")
    latent_mask = Image.new("L", img.size, "white")
    ImageDraw.Draw(latent_mask).rectangle((left + (blur // 2 if left > 0 else 0), up + (blur // 2 if up > 0 else 0),
                                           target_w - right - (blur // 2 if right > 0 else 0),
                                           target_h - down - (blur // 2 if down > 0 else 0)), fill="black")
    grid = split_grid(img, tile_w, tile_h, options.pixels)
    grid_mask = split_grid(mask, tile_w, tile_h, options.pixels)
    grid_latent = split_grid(latent_mask, tile_w, tile_h, options.pixels)
    seed, subseed = _fixed_seeds(req)
    work, requests = [], []
    for r, ((y, h, row), (_, _, row_mask), (_, _, row_latent)) in enumerate(zip(grid.tiles, grid_mask.tiles,
                                                                                 grid_latent.tiles)):
        for c, (tile, tile_mask, tile_latent) in enumerate(zip(row, row_mask, row_latent)):
            x, w = tile[0:2]
            if x >= left and x + w <= target_w - right and y >= up and y + h <= target_h - down:
                continue  # inside the original image
            image = tile[2] if options.inpainting_fill == 1 else masked_fill(tile[2], tile_latent[2])
            work.append((r, c))
            requests.append(replace(req, init_image=image, mask=tile_mask[2], latent_mask=tile_latent[2],
                                    width=tile_w, height=tile_h, mask_blur=blur * 2, inpaint_full_res=False,
                                    resize_mode=0, batch_size=1, n_iter=1, seed=seed + len(requests),
                                    subseed=subseed))
    return PoorMansPlan(grid, work, requests)


# -- Outpainting mk2 --------------------------------------------------------------------------------

def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """scikit-image's `exposure.match_histograms(image, reference, channel_axis=1)` for float
    (pixels, channels) arrays: each channel's values mapped to the reference's at the same
    quantile (`_match_cumulative_cdf`)."""
    out = np.empty(image.shape, np.float64)
    for c in range(image.shape[1]):
        src_values, src_lookup, src_counts = np.unique(image[:, c], return_inverse=True, return_counts=True)
        tmpl_values, tmpl_counts = np.unique(reference[:, c], return_counts=True)
        src_quantiles = np.cumsum(src_counts) / image[:, c].size
        tmpl_quantiles = np.cumsum(tmpl_counts) / reference[:, c].size
        out[:, c] = np.interp(src_quantiles, tmpl_quantiles, tmpl_values)[src_lookup.reshape(-1)]
    return out


def _fft2(data: np.ndarray) -> np.ndarray:
    # Ortho-normalised and shifted before and after, per channel, as the script's helpers.
    out = np.zeros(data.shape, np.complex128)
    for c in range(data.shape[2]):
        out[:, :, c] = np.fft.ifftshift(np.fft.fft2(np.fft.fftshift(data[:, :, c]), norm="ortho"))
    return out


def _ifft2(data: np.ndarray) -> np.ndarray:
    out = np.zeros(data.shape, np.complex128)
    for c in range(data.shape[2]):
        out[:, :, c] = np.fft.ifftshift(np.fft.ifft2(np.fft.fftshift(data[:, :, c]), norm="ortho"))
    return out


def matched_noise(src: np.ndarray, mask_rgb: np.ndarray, noise_q: float = 1.0,
                  color_variation: float = 0.05) -> np.ndarray:
    """The script's `get_matched_noise` (from g-diffuser-bot): `src` (H, W, 3) in [0, 1] with its
    masked area (`mask_rgb`, 1 = new) replaced by noise whose spectrum follows the known area's
    (`noise_q`: the fall-off exponent, lower = more detail), grey but for `color_variation`, and
    whose histogram is the known area's. The noise comes from a generator seeded 0, as there."""
    width, height, channels = src.shape  # the script's names: its "width" is the rows
    mask_grey = np.sum(mask_rgb, axis=2) / 3.0
    img_mask = mask_grey > 1e-6
    ref_mask = mask_grey < 1e-3

    windowed = src * (1.0 - np.repeat(mask_grey[:, :, None], 3, axis=2))
    windowed /= np.max(windowed)
    windowed += np.average(src) * mask_rgb  # the average colour, not black, in the hole: a better spectrum
    src_fft = _fft2(windowed)
    src_dist = np.absolute(src_fft)
    src_phase = src_fft / src_dist

    rng = np.random.default_rng(0)
    # The script's window, mode 1 ("hey wait a minute that's not gaussian"), std 3.14.
    scale_x, scale_y = width / min(width, height), height / min(width, height)
    x = (np.arange(width) / width * 2.0 - 1.0) * scale_x
    fy = (np.arange(height) / height * 2.0 - 1.0) * scale_y
    window = (1 / ((x[:, None] ** 2 + 1.0) * (fy[None, :] ** 2 + 1.0))) ** (3.14 / 3.14)
    noise_rgb = rng.random((width, height, channels))
    noise_grey = np.sum(noise_rgb, axis=2) / 3.0
    noise_rgb *= color_variation
    for c in range(channels):
        noise_rgb[:, :, c] += (1.0 - color_variation) * noise_grey
    noise_fft = _fft2(noise_rgb)
    for c in range(channels):
        noise_fft[:, :, c] *= window
    noise_rgb = np.real(_ifft2(noise_fft))
    shaped_fft = _fft2(noise_rgb)
    shaped_fft[:, :, :] = np.absolute(shaped_fft) ** 2 * (src_dist ** noise_q) * src_phase

    shaped = np.real(_ifft2(shaped_fft))
    shaped -= np.min(shaped)
    shaped /= np.max(shaped)
    # brightness_variation is 0 in the script, so the reference is the image itself.
    shaped[img_mask, :] = match_histograms(shaped[img_mask, :], src[ref_mask, :])
    shaped = src * (1.0 - mask_rgb) + shaped * mask_rgb
    return np.clip(shaped, 0.0, 1.0)


@dataclass(frozen=True)
class OutpaintingMk2:
    """The script's arguments after its info placeholder (its `run` signature), with its defaults."""

    pixels: int = 128  # "Pixels to expand", 8-256 step 8
    mask_blur: int = 8  # "Mask blur", 0-64
    direction: tuple[str, ...] = DIRECTIONS  # "Outpainting direction"
    noise_q: float = 1.0  # "Fall-off exponent (lower=higher detail)", 0-4
    color_variation: float = 0.05  # "Color variation", 0-1

    def __post_init__(self):
        object.__setattr__(self, "direction", _directions(self.direction, MK2_TITLE))
        _check_pixels(self.pixels, MK2_TITLE)
        if not 0 <= self.mask_blur <= 64:
            raise SdlabError(f"{MK2_TITLE}: mask blur {self.mask_blur} is outside 0-64")
        if not 0.0 <= self.noise_q <= 4.0:
            raise SdlabError(f"{MK2_TITLE}: fall-off exponent {self.noise_q} is outside 0-4")
        if not 0.0 <= self.color_variation <= 1.0:
            raise SdlabError(f"{MK2_TITLE}: color variation {self.color_variation} is outside 0-1")


@dataclass(frozen=True)
class Mk2Side:
    """One expansion: the side and by how many pixels."""

    side: str
    pixels: int


@dataclass
class Mk2Plan:
    req: GenerationRequest
    options: OutpaintingMk2
    sides: list[Mk2Side]
    seed: int
    subseed: int
    size: tuple[int, int]  # the request's width and height: the strips' largest size
    images: int  # batch size: images expanded side by side, image n from seed + n
    repeats: int  # batch count: the same images again (same seeds)

    @property
    def count(self) -> int:
        return len(self.sides) * self.images

    def _strip(self, w: int, h: int, side: Mk2Side) -> tuple[int, int, int, int, int, int]:
        """(res_w, res_h, canvas_w, canvas_h, strip_w, strip_h) of an image of w x h grown on one
        side: its new size, the canvas rounded up to 64, the strip inpainted (at most the
        request's size along the grown axis)."""
        horizontal = side.side in ("left", "right")
        res_w, res_h = (w + side.pixels, h) if horizontal else (w, h + side.pixels)
        canvas_w, canvas_h = math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64
        strip_w = min(self.size[0], res_w) if horizontal else canvas_w
        strip_h = canvas_h if horizontal else min(self.size[1], res_h)
        return res_w, res_h, canvas_w, canvas_h, strip_w, strip_h

    @property
    def checks(self) -> list[tuple[GenerationRequest, str | None]]:
        out = []
        w, h = self.req.init_image.size
        for side in self.sides:
            res_w, res_h, _, _, strip_w, strip_h = self._strip(w, h, side)
            for n in range(self.images):
                out.append((replace(self.req, width=strip_w, height=strip_h, batch_size=1, n_iter=1), None))
            w, h = res_w, res_h
        return out

    def expand(self, image: Image.Image, side: Mk2Side, n: int) -> tuple[Image.Image, GenerationRequest, tuple]:
        """Image n grown on one side: the canvas with matched noise, the request that inpaints its
        strip, and (res_w, res_h, paste position) to put the result back."""
        blur = self.options.mask_blur
        blur_x = blur if any(d in self.options.direction for d in ("left", "right")) else 0
        blur_y = blur if any(d in self.options.direction for d in ("up", "down")) else 0
        is_left, is_right, is_top, is_bottom = (side.side == s for s in DIRECTIONS)
        res_w, res_h, canvas_w, canvas_h, width, height = self._strip(image.width, image.height, side)
        canvas = Image.new("RGB", (canvas_w, canvas_h))
        canvas.paste(image, (side.pixels if is_left else 0, side.pixels if is_top else 0))
        mask = Image.new("RGB", canvas.size, "white")
        ImageDraw.Draw(mask).rectangle((side.pixels + blur_x if is_left else 0, side.pixels + blur_y if is_top else 0,
                                        mask.width - side.pixels - blur_x if is_right else res_w,
                                        mask.height - side.pixels - blur_y if is_bottom else res_h), fill="black")
        noised = matched_noise(np.asarray(canvas) / 255.0, np.asarray(mask) / 255.0, self.options.noise_q,
                               self.options.color_variation)
        output = Image.fromarray(np.clip(noised * 255.0, 0.0, 255.0).astype(np.uint8), "RGB")
        crop = (0 if is_left else output.width - width, 0 if is_top else output.height - height,
                width if is_left else output.width, height if is_top else output.height)
        mask = mask.crop(crop)
        latent_mask = Image.new("RGB", (width, height), "white")
        ImageDraw.Draw(latent_mask).rectangle((
            side.pixels + blur_x * 2 if is_left else 0, side.pixels + blur_y * 2 if is_top else 0,
            mask.width - side.pixels - blur_x * 2 if is_right else res_w,
            mask.height - side.pixels - blur_y * 2 if is_bottom else res_h), fill="black")
        if width % 8 or height % 8:
            raise SdlabError(f"{MK2_TITLE}: the strip to inpaint would be {width}x{height}, not a multiple of 8; "
                             "resize the image to a multiple of 8 first")
        req = replace(self.req, init_image=output.crop(crop), mask=mask, latent_mask=latent_mask, width=width,
                      height=height, mask_blur=blur * 4, inpaint_full_res=False, resize_mode=0, batch_size=1,
                      # image n of the web UI's batch: seed + n (the same seed for all with a variation
                      # strength), variation seed + n
                      n_iter=1, seed=self.seed + (0 if self.req.subseed_strength else n), subseed=self.subseed + n)
        paste = (0 if is_left else output.width - width, 0 if is_top else output.height - height)
        return output, req, (res_w, res_h, paste)

    def run(self, generate: Generate) -> ScriptOutput:
        images = [self.req.init_image.convert("RGB")] * self.images
        results: list[GenerationResult] = []
        interrupted = False
        for side in self.sides:
            grown = []
            for n, image in enumerate(images):
                output, req, (res_w, res_h, paste) = self.expand(image, side, n)
                try:
                    res = generate(req, None)
                except Interrupted:
                    res = None
                if res is not None and res.images:
                    results.append(res)
                    output.paste(res.images[0], paste)
                    grown.append(output.crop((0, 0, res_w, res_h)))
                if res is None or res.interrupted or not res.images:
                    interrupted = True
                    break
            images = grown or images
            if interrupted:
                break
        if not results:
            raise SdlabError(f"{MK2_TITLE}: interrupted before the first side")
        info = results[0].infotexts[0]
        from ..infotext import with_infotext

        made = [with_infotext(img, info) for img in images] * (1 if interrupted else self.repeats)
        out_images, texts = list(made), [info] * len(made)
        if len(made) > 1:  # the web UI's return_grid, unless there is only one image
            out_images.insert(0, with_infotext(image_grid(made, rows=round(math.sqrt(len(made)))), info))
            texts.insert(0, info)
        return ScriptOutput(out_images, texts, results, 0, interrupted, [results[0].request.prompt] * len(made),
                            grids=len(out_images) - len(made), intermediate=True)


def plan_mk2(req: GenerationRequest, options: OutpaintingMk2 = OutpaintingMk2()) -> Mk2Plan:
    """The sides to grow, in the script's order, and the seeds of the images."""
    if req.init_image is None:
        raise SdlabError(f"{MK2_TITLE} works on img2img: give an init image")
    init = req.init_image
    left, right, up, down, _, _ = _canvas_sides(init.width, init.height, options.pixels, options.direction)
    sides = [Mk2Side(s, p) for s, p in (("left", left), ("right", right), ("up", up), ("down", down)) if p > 0]
    seed, subseed = _fixed_seeds(req)
    return Mk2Plan(req, options, sides, seed, subseed, _size(req), req.batch_size, req.n_iter)
