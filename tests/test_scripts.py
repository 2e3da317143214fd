"""The web UI's scripts as recipes (recipes/prompt_matrix.py, prompts_from_file.py,
outpaint_scripts.py) and its img2img resize modes (resize.py), from Python: each rule against a
hand computation of the web UI's, and each image a script makes equal to the plain request that
makes it alone. The API's side is tests/server/test_scripts_api.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdlab.errors import SdlabError
from sdlab.pipeline import GenerationRequest, Pipeline
from sdlab.recipes import outpaint_scripts as ops
from sdlab.recipes import prompt_matrix, prompts_from_file
from sdlab.recipes.scripts import pipeline_generate
from sdlab.resize import resize_image

from .tiny import tiny_bundle


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_bundle("sd1", seed=0))


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


# -- resize modes -------------------------------------------------------------------------------------

def test_resize_modes_by_hand():
    """images.resize_image's modes on a 48x16 image into 32x32 and a 16x48 one into 32x16."""
    wide, tall = noise_image(48, 16, 1), noise_image(16, 48, 2)
    assert arr(resize_image(0, wide, 32, 32)).tolist() == arr(wide.resize((32, 32), Image.LANCZOS)).tolist()
    # 1: scaled to cover (96x32), the centre kept
    assert arr(resize_image(1, wide, 32, 32)).tolist() == arr(wide.resize((96, 32), Image.LANCZOS).crop(
        (32, 0, 64, 32))).tolist()
    # 2: scaled to fit (32x10) at rows 11-20; above and below, the outer rows stretched: PIL's bicubic
    # at the border, 1.125 * the edge row - 0.125 * the next (to a level, PIL's fixed point)
    filled, small = arr(resize_image(2, wide, 32, 32)), arr(wide.resize((32, 10), Image.LANCZOS))
    assert filled[11:21].tolist() == small.tolist()
    top, bottom = 1.125 * small[0] - 0.125 * small[1], 1.125 * small[-1] - 0.125 * small[-2]
    assert np.abs(filled[:11] - np.clip(top, 0, 255)).max() <= 1 and (filled[:11] == filled[0]).all()
    assert np.abs(filled[21:] - np.clip(bottom, 0, 255)).max() <= 1 and (filled[21:] == filled[21]).all()
    # 2 the other way: 16x48 into 32x16 fits as 5x16 at columns 14-18, the columns stretched sideways
    filled, small = arr(resize_image(2, tall, 32, 16)), arr(tall.resize((5, 16), Image.LANCZOS))
    assert filled[:, 14:19].tolist() == small.tolist()
    left = 1.125 * small[:, 0] - 0.125 * small[:, 1]
    assert np.abs(filled[:, :14] - np.clip(left, 0, 255)[:, None]).max() <= 1
    # a mask keeps its mode; same geometry
    mask = resize_image(1, wide.convert("L"), 32, 32)
    assert mask.mode == "L" and mask.size == (32, 32)
    with pytest.raises(SdlabError, match="resize mode 4"):
        resize_image(4, wide, 32, 32)


def test_latent_upscale_encodes_at_the_image_size_then_resizes_the_latent_bilinearly(pipe):
    """Resize mode 3 at strength 0 gives back the init latent decoded: the image encoded at its
    own 48x16 size (the seed's encoding noise) and its latent interpolated bilinearly to 32x32."""
    from sdlab import steps
    from sdlab.images import to_pil, to_tensor
    from sdlab.sampling.noise import PerImageNoise

    wide = noise_image(48, 16, 3)
    res = pipe.generate(GenerationRequest(init_image=wide, width=32, height=32, steps=2, seed=5,
                                          denoising_strength=0.0, resize_mode=3))
    b = pipe.bundle
    f = b.config.vae.downsample_factor
    noise = PerImageNoise((4, 32 // f, 32 // f), [5])
    with torch.no_grad():
        latent = steps.encode_image(b.vae, to_tensor(wide), b.family, noise)
        assert latent.shape[-2:] == (16 // f, 48 // f)
        latent = torch.nn.functional.interpolate(latent, size=(32 // f, 32 // f), mode="bilinear")
        expected = to_pil(steps.decode(b.vae, latent, b.family))[0]
    assert arr(res.images[0]).tolist() == arr(expected).tolist()
    with pytest.raises(SdlabError, match="latent upscale"):
        pipe.generate(GenerationRequest(init_image=wide, mask=wide.convert("L"), resize_mode=3, steps=1))


# -- prompt matrix ---------------------------------------------------------------------------------

def test_matrix_prompts_in_the_web_ui_order():
    parts, prompts = prompt_matrix.matrix_prompts("a cat |red, | big")
    assert parts == ["a cat ", "red, ", " big"]
    assert prompts == ["a cat ", "a cat , red", "a cat , big", "a cat , red, big"]
    _, prompts = prompt_matrix.matrix_prompts("a cat|red|big", put_at_start=True, delimiter=" ")
    assert prompts == ["a cat", "red a cat", "big a cat", "red big a cat"]
    with pytest.raises(SdlabError, match="prompt type"):
        prompt_matrix.PromptMatrix(prompt_type="both")


def test_prompt_matrix_cells_equal_plain_requests_and_the_grid_labels_them(pipe):
    """Four cells over "x|red|big" (negative prompt; seeds 7..10 with Random seeds), each the
    plain request's image; the grid is 2x2 cells (rows 1 << (2 // 2)) with the labels' pads."""
    base = GenerationRequest(prompt="a circle", negative_prompt="x|red|big", width=32, height=32, steps=2, seed=7,
                             subseed=3, sampler="Euler")
    plan = prompt_matrix.plan(base, prompt_matrix.PromptMatrix(different_seeds=True, prompt_type="negative",
                                                               margin_size=4))
    out = plan.run(pipeline_generate(pipe))
    assert plan.count == 4 and out.index_of_first_image == 1 and len(out.images) == 5
    for n, negative in ((0, "x"), (3, "x, red, big")):
        alone = pipe.generate(GenerationRequest(prompt="a circle", negative_prompt=negative, width=32, height=32,
                                                steps=2, seed=7 + n, subseed=3 + n, sampler="Euler"))
        assert arr(out.images[1 + n]).tolist() == arr(alone.images[0]).tolist()
        assert out.infotexts[1 + n] == alone.infotexts[0]
    grid = out.images[0]
    size = 32 + 32  # cell width + height: the font (w + h) // 25, the label pads from it
    fontsize = size // 25
    assert grid.width == 2 * 32 + 4 + 32 * 3 // 4 and grid.height > 2 * 32 + 4 + fontsize
    assert out.infotexts[0] == out.infotexts[1]
    # the cells sit where the web UI puts them: bottom right is "red, big"
    cell = arr(grid)[grid.height - 32:, grid.width - 32:]
    assert cell.tolist() == arr(out.images[4]).tolist()


def test_prompt_matrix_labels_strike_the_parts_left_out():
    from sdlab.recipes.prompt_matrix import draw_prompt_matrix
    from sdlab.recipes.xyz import TEXT_INACTIVE_COLOR

    cells = Image.new("RGB", (2 * 64, 64), "black")
    grid = arr(draw_prompt_matrix(cells, 64, 64, ["x", "red"]))
    top = grid[:grid.shape[0] - 64]
    left, right = top[:, :64], top[:, 64:]
    grey = np.all(left == TEXT_INACTIVE_COLOR, axis=-1)
    assert grey.any() and not np.all(right == TEXT_INACTIVE_COLOR, axis=-1).any()  # "red" off, then on
    assert grey.sum(axis=1).max() >= 8  # the strike line runs across the word


# -- prompts from file -----------------------------------------------------------------------------

def test_line_options_as_the_script_parses_them():
    line = prompts_from_file.parse_line('--prompt a red "round cat" --steps 5 --negative_prompt dull --cfg_scale 4.5 '
                                        '--sampler_name "euler a" --styles "one, two" --tiling true --sd_model other')
    assert line.fields == {"prompt": "a red round cat", "steps": 5, "negative_prompt": "dull", "cfg_scale": 4.5,
                           "sampler": "Euler a", "styles": ["one", "two"], "tiling": True}
    assert line.checkpoint == "other"
    assert prompts_from_file.parse_line("a cat -- and a dog").fields == {"prompt": "a cat -- and a dog"}
    from sdlab.sampling.samplers import SAMPLERS

    assert prompts_from_file.parse_line("--sampler_index 1 --restore_faces false --do_not_save_grid true").fields == {
        "sampler": list(SAMPLERS)[1]}
    for bad, words in (("--stepz 5", "unknown option --stepz"), ("--steps", "missing value for --steps"),
                       ("--steps five", "--steps 'five'"), ('--prompt "open', "close the quotes"),
                       ("--restore_faces true", "face restoration"), ("--outpath_samples /tmp", "where files"),
                       ("--sampler_name nope", "unknown sampler")):
        with pytest.raises(SdlabError, match=words) as e:
            prompts_from_file.parse_line(bad)
        assert "\n" not in str(e.value)


def test_prompts_from_file_seeds_and_prompt_position():
    base = GenerationRequest(prompt="oil painting", negative_prompt="blurry", seed=10, batch_size=2, n_iter=1)
    text = "a cat\n\n--prompt a dog --negative_prompt dark --seed 99\n--steps 3\n"
    plan = prompts_from_file.plan(base, prompts_from_file.PromptsFromFile(True, False, "end", text))
    reqs = [r for r, _ in plan.requests]
    assert [r.prompt for r in reqs] == ["oil painting a cat", "oil painting a dog", "oil painting"]
    assert [r.negative_prompt for r in reqs] == ["blurry", "blurry dark", "blurry"]
    assert [r.seed for r in reqs] == [10, 99, 14] and reqs[2].steps == 3  # +batch_size*n_iter per line
    plan = prompts_from_file.plan(GenerationRequest(prompt="", seed=-1), prompts_from_file.PromptsFromFile(
        False, True, "start", "a\nb"))
    assert plan.requests[0][0].seed == plan.requests[1][0].seed >= 0  # one random seed for all
    plan = prompts_from_file.plan(GenerationRequest(seed=-1), prompts_from_file.PromptsFromFile(prompt_txt="a\nb"))
    assert [r.seed for r, _ in plan.requests] == [-1, -1]  # each line draws its own
    with pytest.raises(SdlabError, match="empty"):
        prompts_from_file.plan(base, prompts_from_file.PromptsFromFile(prompt_txt="\n \n"))


def test_prompts_from_file_images_equal_plain_requests(pipe):
    base = GenerationRequest(prompt="a circle", width=32, height=32, steps=2, seed=3, sampler="Euler")
    plan = prompts_from_file.plan(base, prompts_from_file.PromptsFromFile(prompt_txt="red\n--prompt blue --steps 1"))
    out = plan.run(pipeline_generate(pipe))
    for image, req in zip(out.images, (GenerationRequest(prompt="red a circle", width=32, height=32, steps=2, seed=3,
                                                         sampler="Euler"),
                                       GenerationRequest(prompt="blue a circle", width=32, height=32, steps=1, seed=3,
                                                         sampler="Euler"))):
        assert arr(image).tolist() == arr(pipe.generate(req).images[0]).tolist()
    line = prompts_from_file.plan(base, prompts_from_file.PromptsFromFile(prompt_txt="--sd_model other"))
    with pytest.raises(SdlabError, match="names the checkpoint 'other'"):
        line.run(pipeline_generate(pipe))


# -- outpainting -------------------------------------------------------------------------------------

def test_split_and_combine_grid_as_the_web_ui():
    img = noise_image(64, 40, 4)
    grid = ops.split_grid(img, 32, 24, 8)
    # cols ceil((64-8)/24) = 3 at x 0, 16, 32; rows ceil((40-8)/16) = 2 at y 0, 16
    assert [y for y, _, _ in grid.tiles] == [0, 16] and [x for x, _, _ in grid.tiles[0][2]] == [0, 16, 32]
    assert arr(ops.combine_grid(grid)).tolist() == arr(img).tolist()
    # a changed tile blends in linearly over the overlap: weight r * 255 // 8 / 255 at column r
    grid.tiles[0][2][1][2] = Image.new("RGB", (32, 24), (255, 255, 255))
    out = arr(ops.combine_grid(grid))
    for r in range(8):
        a = math.floor(r * 255 / 8) / 255
        assert np.abs(out[5, 16 + r] - (a * 255 + (1 - a) * arr(img)[5, 16 + r])).max() <= 1
    assert (out[5, 24:32] == 255).all()


def test_masked_fill_keeps_the_rest_and_fills_from_around():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (200, 40, 20)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    filled = arr(ops.masked_fill(Image.fromarray(img), Image.fromarray(mask)))
    assert (filled[:, :16] == (200, 40, 20)).all()
    # the only colour around, to the rounding of 8-bit premultiplied alpha over eleven layers
    assert np.abs(filled[:, 16:] - (200, 40, 20)).max() <= 4 and np.abs(filled[:, 16:] - (200, 40, 20)).mean() < 1


def test_histogram_matching_by_hand():
    """Each value goes to the reference's value at the same quantile (linear between)."""
    source = np.array([[0.1], [0.5], [0.9], [0.5]])
    reference = np.array([[10.0], [20.0], [30.0], [40.0]])
    # source quantiles: 0.1 -> 1/4, 0.5 -> 3/4, 0.9 -> 1; reference 10..40 at 1/4..1
    assert ops.match_histograms(source, reference)[:, 0].tolist() == [10.0, 30.0, 40.0, 30.0]


def test_matched_noise_is_the_web_ui_function_with_scikit_image():
    skimage = pytest.importorskip("skimage.exposure")
    img = Image.new("RGB", (48, 32))
    img.paste(noise_image(24, 32, 5), (0, 0))
    mask = Image.new("RGB", img.size, "white")
    ImageDraw.Draw(mask).rectangle((0, 0, 20, 32), fill="black")
    src, m = np.asarray(img) / 255.0, np.asarray(mask) / 255.0
    ours = ops.matched_noise(src, m, 0.7, 0.2)
    grey = m.sum(axis=2) / 3.0
    calls = []
    original = ops.match_histograms
    try:  # the same function with scikit-image's histogram matching in its place
        ops.match_histograms = lambda a, b: calls.append(1) or skimage.match_histograms(a, b, channel_axis=1)
        theirs = ops.matched_noise(src, m, 0.7, 0.2)
    finally:
        ops.match_histograms = original
    assert calls and np.abs(ours - theirs).max() < 1e-12
    assert (ours[grey < 1e-3] == src[grey < 1e-3]).all() and ours[grey > 0].std() > 0.01


def test_poor_mans_outpainting_tiles_as_the_web_ui_draws_them(pipe):
    """32x32 grown 8 px left and right: a 64x64 canvas (rounded to 64; 16 px each side, the image
    at (16, 0)), tiles of 32 overlapping by 8 at x, y = 0, 16, 32; the middle column lies in the
    image and is skipped; each of the other 6 an inpaint request of its own, seed + 1 each."""
    init = noise_image(32, 32, 6)
    base = GenerationRequest(prompt="a circle", init_image=init, width=32, height=32, steps=2, seed=40, subseed=2,
                             sampler="Euler", denoising_strength=0.8)
    plan = ops.plan_poor_mans(base, ops.PoorMansOutpainting(8, 2, 1, ("left", "right")))
    canvas = Image.new("RGB", (64, 64))
    canvas.paste(init, (16, 0))
    mask, latent = Image.new("L", (64, 64), 255), Image.new("L", (64, 64), 255)
    ImageDraw.Draw(mask).rectangle((16 + 4, 0, 64 - 16 - 4, 64), fill=0)
    ImageDraw.Draw(latent).rectangle((16 + 1, 0, 64 - 16 - 1, 64), fill=0)
    assert plan.work == [(r, c) for r in range(3) for c in (0, 2)]
    for k, ((r, c), req) in enumerate(zip(plan.work, plan.requests)):
        box = (16 * c, 16 * r, 16 * c + 32, 16 * r + 32)
        assert arr(req.init_image).tolist() == arr(canvas.crop(box)).tolist()
        assert np.array_equal(np.asarray(req.mask), np.asarray(mask.crop(box)))
        assert np.array_equal(np.asarray(req.latent_mask), np.asarray(latent.crop(box)))
        assert (req.seed, req.subseed, req.mask_blur, req.inpaint_full_res) == (40 + k, 2, 4, False)
    out = plan.run(pipeline_generate(pipe))
    assert len(out.images) == 1 and out.images[0].size == (64, 64)
    # each tile is the plain inpaint request's image, made alone
    first = plan.requests[0]
    alone = pipe.generate(GenerationRequest(prompt="a circle", init_image=canvas.crop((0, 0, 32, 32)),
                                            mask=mask.crop((0, 0, 32, 32)), latent_mask=latent.crop((0, 0, 32, 32)),
                                            width=32, height=32, steps=2, seed=40, subseed=2, sampler="Euler",
                                            denoising_strength=0.8, mask_blur=4))
    assert arr(out.results[0].images[0]).tolist() == arr(alone.images[0]).tolist() and first.seed == 40
    # the middle columns 24-31 came from no tile: the image as it was
    assert arr(out.images[0])[:32, 24:32].tolist() == arr(init)[:, 8:16].tolist()
    # "fill": the tile starts from the colours around the new area, not black
    fill = ops.plan_poor_mans(base, ops.PoorMansOutpainting(8, 2, 0, ("left", "right")))
    assert arr(fill.requests[0].init_image)[:, :8].mean() > 20
    for bad, words in ((dict(inpainting_fill=2), "latent noise"), (dict(direction=("sideways",)), "sideways"),
                       (dict(pixels=12), "multiple of 8"), (dict(direction=()), "no direction")):
        with pytest.raises(SdlabError, match=words):
            ops.PoorMansOutpainting(**bad)


def test_outpainting_mk2_strip_equals_the_plain_request(pipe):
    """64x64 grown 64 px to the right with a 96x64 request: a 128x64 canvas whose new half is the
    matched noise, the right 96x64 strip inpainted (mask black up to x 64 - 64 - blur ... in canvas
    terms, inset by pixels + blur), pasted back; the left 32 columns never change."""
    init = noise_image(64, 64, 7)
    base = GenerationRequest(prompt="a circle", init_image=init, width=96, height=64, steps=2, seed=11, subseed=1,
                             sampler="Euler", denoising_strength=0.8)
    plan = ops.plan_mk2(base, ops.OutpaintingMk2(64, 4, ("right",), 1.0, 0.05))
    out = plan.run(pipeline_generate(pipe))
    assert plan.count == 1 and len(out.images) == 1 and out.images[0].size == (128, 64)
    canvas = Image.new("RGB", (128, 64))
    canvas.paste(init, (0, 0))
    mask = Image.new("RGB", (128, 64), "white")
    ImageDraw.Draw(mask).rectangle((0, 0, 128 - 64 - 4, 64), fill="black")
    noised = ops.matched_noise(np.asarray(canvas) / 255.0, np.asarray(mask) / 255.0, 1.0, 0.05)
    start = Image.fromarray(np.clip(noised * 255.0, 0, 255).astype(np.uint8))
    latent = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(latent).rectangle((0, 0, 96 - 64 - 8, 64), fill="black")
    alone = pipe.generate(GenerationRequest(prompt="a circle", init_image=start.crop((32, 0, 128, 64)),
                                            mask=mask.crop((32, 0, 128, 64)), latent_mask=latent, width=96, height=64,
                                            steps=2, seed=11, subseed=1, sampler="Euler", denoising_strength=0.8,
                                            mask_blur=16))
    expected = start.copy()
    expected.paste(alone.images[0], (32, 0))
    assert arr(out.images[0]).tolist() == arr(expected).tolist()
    assert arr(out.images[0])[:, :32].tolist() == arr(init)[:, :32].tolist()


def test_img2img_cli_resize_mode(tmp_path, monkeypatch):
    """`sdlab img2img --resize-mode 1` crops as the API's resize_mode 1: the image the Python API
    makes from the init image cropped by hand (scaled to cover 32x32, the centre kept)."""
    import sdlab
    from sdlab.cli import main

    from .tiny import save_native

    loaded = {}
    real_load = sdlab.load
    monkeypatch.setattr(sdlab, "load", lambda model, **kw: loaded.setdefault(str(model), real_load(model, **kw)))
    model = save_native(tiny_bundle("sd1", seed=0), tmp_path / "tiny.safetensors")
    wide = noise_image(48, 16, 8)
    wide.save(tmp_path / "wide.png")
    out = tmp_path / "out.png"
    assert main(["img2img", "a circle", "--init", str(tmp_path / "wide.png"), "-m", str(model), "-W", "32", "-H", "32",
                 "--resize-mode", "1", "--steps", "2", "--seed", "4", "--sampler", "Euler", "-o", str(out)]) == 0
    by_hand = wide.resize((96, 32), Image.LANCZOS).crop((32, 0, 64, 32))
    (pipe,) = loaded.values()  # the model the command loaded, as it loaded it
    expected = pipe.img2img(by_hand, "a circle", width=32, height=32, steps=2, seed=4, sampler="Euler")[0]
    assert arr(Image.open(out)).tolist() == arr(expected).tolist()
