"""Upscalers: model files made here with random weights in the original key layouts (ESRGAN old and
new, Real-ESRGAN x2 with pixel-unshuffle, Real-ESRGAN Compact, SwinIR), loaded through our
registry and run tiled, against spandrel running the same file on the whole image; the web UI's
size rules, the Extras upscale and its infotext; `sdlab upscale`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from sdlab.cli import main
from sdlab.errors import SdlabError
from sdlab.upscalers import (ExtrasUpscale, Upscalers, import_spandrel, load_upscaler_model, postprocess_infotext,
                             tile_spans, tiled_upscale, upscale_extras)

try:  # as sdlab imports it (with the stand-in for a missing torchvision)
    spandrel = import_spandrel()
except SdlabError:
    spandrel = None
needs_spandrel = pytest.mark.skipif(spandrel is None, reason="spandrel is not installed (pip install spandrel)")


# -- random models in the original layouts ----------------------------------------------------------

def _conv(sd: dict, name: str, out_ch: int, in_ch: int, gen: torch.Generator, std: float = 0.1) -> None:
    sd[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=gen) * std
    sd[f"{name}.bias"] = torch.randn(out_ch, generator=gen) * 0.02


def esrgan_old(nf: int = 8, nb: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """ESRGAN x4 as the original repo saved it (`model.0`, `model.1.sub.N.RDBk.convj.0`, ...)."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    _conv(sd, "model.0", nf, 3, gen)
    for i in range(nb):
        for k in (1, 2, 3):
            for j in range(1, 6):
                _conv(sd, f"model.1.sub.{i}.RDB{k}.conv{j}.0", nf if j == 5 else 32, nf + 32 * (j - 1), gen)
    _conv(sd, f"model.1.sub.{nb}", nf, nf, gen)
    for name in ("model.3", "model.6", "model.8"):
        _conv(sd, name, nf, nf, gen)
    _conv(sd, "model.10", 3, nf, gen)
    sd["model.10.bias"] += 0.5  # an output mostly inside [0, 1], so the clamp hides little
    return sd


def esrgan_new(nf: int = 8, nb: int = 1, seed: int = 0, in_ch: int = 3) -> dict[str, torch.Tensor]:
    """RRDBNet as basicsr / Real-ESRGAN save it (`conv_first`, `body.N.rdbk.convj`, ...); in_ch 12
    is Real-ESRGAN x2plus (pixel-unshuffle by 2, then x4)."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    _conv(sd, "conv_first", nf, in_ch, gen)
    for i in range(nb):
        for k in (1, 2, 3):
            for j in range(1, 6):
                _conv(sd, f"body.{i}.rdb{k}.conv{j}", nf if j == 5 else 32, nf + 32 * (j - 1), gen)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        _conv(sd, name, nf, nf, gen)
    _conv(sd, "conv_last", 3, nf, gen)
    sd["conv_last.bias"] += 0.5
    return sd


def compact(nf: int = 8, num_conv: int = 2, scale: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Real-ESRGAN Compact (SRVGGNetCompact): convs and PReLUs in one `body` list."""
    gen, sd = torch.Generator().manual_seed(seed), {}
    _conv(sd, "body.0", nf, 3, gen, 0.3)
    sd["body.1.weight"] = torch.rand(nf, generator=gen) * 0.3
    for i in range(num_conv):
        _conv(sd, f"body.{2 * i + 2}", nf, nf, gen, 0.2)
        sd[f"body.{2 * i + 3}.weight"] = torch.rand(nf, generator=gen) * 0.3
    last = 2 * num_conv + 2
    _conv(sd, f"body.{last}", 3 * scale * scale, nf, gen, 0.2)
    sd[f"body.{last}.bias"] += 0.5
    return sd


def swinir(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny SwinIR x2, built with spandrel's copy of the original network (its keys are the original's)."""
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    net = SwinIR(img_size=16, patch_size=1, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                 mlp_ratio=2.0, upscale=2, img_range=1.0, upsampler="pixelshuffle", resi_connection="1conv")
    return net.state_dict()


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth colour fields plus noise: not flat, not only noise.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 9.0), np.cos(y / 7.0), np.sin((x + y) / 13.0)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def whole(path: Path, img: Image.Image) -> torch.Tensor:
    """spandrel's own loader and call on the whole image (no tiling): the reference."""
    model = spandrel.ModelLoader().load_from_file(path).eval()
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return model(x)[0]


def ours(path: Path, img: Image.Image, tile: int, overlap: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Our loader and tiled run, float output; with the size of every tile the model saw."""
    model = load_upscaler_model(path, "cpu", torch.float32)
    seen = []

    def run(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return model(x)

    src = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    out = torch.empty(3, img.height * model.scale, img.width * model.scale)
    for y, rows in tiled_upscale(run, src, model.scale, tile=tile, overlap=overlap, multiple_of=model.multiple_of):
        out[:, y:y + rows.shape[1]] = rows
    return out, seen


def seam_distance(size: int, spans: list[tuple[int, int]], scale: int) -> np.ndarray:
    """For each output position along an axis: how far (in input pixels) it is from the nearest
    tile edge that lies inside the image."""
    edges = sorted({s for s, _ in spans if s > 0} | {s + n for s, n in spans if s + n < size})
    pos = (np.arange(size * scale) + 0.5) / scale
    return np.min([np.abs(pos - e) for e in edges], axis=0) if edges else np.full(size * scale, np.inf)


# -- tiled equals untiled ----------------------------------------------------------------------------

# (model, file, tile, overlap, receptive radius in input pixels, image height). The radius: every 3x3
# convolution adds one pixel at its own resolution (tiny RRDBNet: 17 at input resolution, under 2
# more after the upsampling; x2plus works at half resolution first, so 36.5); an overlap of 4 radii
# leaves a quarter (the part blending drops) at least one radius wide, and then tiling changes
# nothing. The RRDBNets' images are one tile high (their overlap makes tiles large): their seams run
# one way; the compact model's image is tiled both ways.
CASES = {
    "esrgan-old-pth": (esrgan_old, "ESRGAN/4x_old.pth", 168, 80, 19, 24),
    "esrgan-new-safetensors": (esrgan_new, "ESRGAN/4x_new.safetensors", 168, 80, 19, 24),
    "realesrgan-x2plus-params-ema": (lambda: {"params_ema": esrgan_new(in_ch=12)}, "RealESRGAN/x2plus.pth", 312, 152,
                                     37, 24),
    "realesrgan-compact": (lambda: {"params": compact()}, "RealESRGAN/compact_x2.pth", 48, 16, 4, 53),
}


def _write(sd: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@needs_spandrel
@pytest.mark.parametrize("case", list(CASES))
def test_tiled_upscale_equals_spandrel_on_the_whole_image(tmp_path, case):
    make, rel, tile, overlap, radius, height = CASES[case]
    path = _write(make(), tmp_path / rel)
    img = image(tile + tile // 2 + 3, height)  # 2 tiles across, the last placed against the edge
    ref = whole(path, img)
    out, seen = ours(path, img, tile, overlap)
    assert out.shape == ref.shape
    assert len(seen) == (2 if height <= tile else 4) and max(max(hw) for hw in seen) <= tile + 3
    assert overlap // 4 >= radius
    assert (out - ref).abs().max() < 1e-5


@needs_spandrel
def test_with_the_web_uis_overlap_only_the_seams_differ(tmp_path):
    """Overlap 8 (the default) on a model that sees 4 pixels around: everywhere further than that
    from a tile edge the result is spandrel's exactly; at the seams the ramp keeps it close."""
    path = _write({"params": compact(num_conv=2)}, tmp_path / "compact.pth")
    img = image(100, 70)
    tile, overlap, radius, scale = 40, 8, 4, 2
    ref = whole(path, img)
    out, _ = ours(path, img, tile, overlap)
    far = np.minimum.outer(seam_distance(70, tile_spans(70, tile, overlap), scale),
                           seam_distance(100, tile_spans(100, tile, overlap), scale)) > radius
    diff = (out - ref).abs().numpy().max(axis=0)
    assert far.mean() > 0.5 and diff[far].max() < 1e-5
    assert 1e-4 < diff[~far].max() < 0.5 and diff[~far].mean() < 0.01


@needs_spandrel
def test_swinir_loads_and_runs_whole_and_tiled(tmp_path):
    """SwinIR attends across whole windows (spandrel marks it 'tiling discouraged'): untiled it is
    spandrel's result; tiled it runs in tiles of the asked size."""
    path = _write(swinir(), tmp_path / "SwinIR" / "swinir_x2.safetensors")
    img = image(40, 20)
    ref = whole(path, img)
    out, seen = ours(path, img, 0, 0)
    assert seen == [(20, 40)] and (out - ref).abs().max() < 1e-5
    tiled, seen = ours(path, img, 24, 8)
    assert tiled.shape == ref.shape and seen == [(20, 24), (20, 24)] and (tiled - ref).abs().mean() < 0.05
    with pytest.raises(SdlabError, match="SwinIR models do not run in fp16"):
        load_upscaler_model(path, "cpu", torch.float16)


# -- memory stays bounded: what the model and the output buffers see ---------------------------------

def test_tiles_are_bounded_at_any_image_size():
    """A 1100x700 image, a stand-in x2 model that counts its calls: every call gets one tile of at
    most 192x192, there are exactly rows x cols of them, and the output arrives in bands of at
    most 192*2 rows (what the tiler holds besides the input), covering the image once."""
    calls = []

    def x2(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape[-2:]))
        return x.repeat_interleave(2, -2).repeat_interleave(2, -1)

    src = torch.from_numpy(np.array(image(1100, 700))).permute(2, 0, 1)
    rows, cols = tile_spans(700, 192, 8), tile_spans(1100, 192, 8)
    assert (len(rows), len(cols)) == (4, 6)  # ceil((700 - 8) / 184), ceil((1100 - 8) / 184)
    bands, covered, first_rows = [], 0, None
    for y, part in tiled_upscale(x2, src, 2):
        assert y == covered and part.shape[1] <= 192 * 2 and part.shape[2] == 2200
        covered += part.shape[1]
        bands.append(part.shape[1])
        if first_rows is None:
            first_rows = part[:, :2]
    assert covered == 1400 and len(bands) == len(rows)
    assert len(calls) == 4 * 6 and max(max(c) for c in calls) == 192
    # A model that works pixel by pixel is untouched by tiling.
    expect = src[:, :1].float().div(255).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert (first_rows - expect).abs().max() < 1e-6


def test_tile_placement_matches_the_web_uis_grid():
    # images.split_grid: ceil((w - overlap) / (tile - overlap)) tiles, spread evenly, the last at the edge.
    assert tile_spans(512, 192, 8) == [(0, 192), (160, 192), (320, 192)]
    assert tile_spans(192, 192, 8) == [(0, 192)] and tile_spans(100, 192, 8) == [(0, 100)]
    assert tile_spans(500, 192, 8, multiple_of=4) == [(0, 192), (152, 192), (308, 192)]
    spans = tile_spans(501, 100, 8, multiple_of=16)
    assert all(s % 16 == 0 for s, _ in spans) and spans[-1][0] + spans[-1][1] == 501
    assert all(a + n - b >= 8 for (a, n), (b, _) in zip(spans, spans[1:]))


# -- the registry and the web UI's rules ---------------------------------------------------------------

@pytest.fixture
def models(tmp_path) -> Path:
    root = tmp_path / "models"
    for rel in ("ESRGAN/4x-UltraSharp.pth", "RealESRGAN/RealESRGAN_x2plus.pth", "upscale_models/anime.safetensors",
                "DAT/sub/DAT_x3.pth", "SwinIR/.hidden.pth", "ESRGAN/notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


def test_listing_has_the_built_ins_first_then_files_by_name(models):
    entries = Upscalers(models).list()
    assert [e.name for e in entries] == ["None", "Lanczos", "Nearest", "4x-UltraSharp", "anime", "DAT_x3",
                                         "RealESRGAN_x2plus"]
    by_name = {e.name: e for e in entries}
    assert (by_name["None"].path, by_name["None"].scale, by_name["None"].model_name) == (None, 4, None)
    assert by_name["4x-UltraSharp"].model_name == "ESRGAN_4x" and by_name["4x-UltraSharp"].scale == 4
    assert by_name["RealESRGAN_x2plus"].scale == 2 and by_name["DAT_x3"].scale == 3
    assert by_name["anime"].scale == 4 and by_name["anime"].folder == "upscale_models"


def test_an_unknown_upscaler_is_one_line_naming_those_there_are(models):
    with pytest.raises(SdlabError) as e:
        Upscalers(models).find("4x-Missing")
    assert "no upscaler named '4x-Missing'" in str(e.value) and "4x-UltraSharp" in str(e.value)
    assert "\n" not in str(e.value)
    assert Upscalers(models).find("lanczos").name == "Lanczos"


@pytest.mark.parametrize("name", ["Lanczos", "Nearest", "None"])
def test_sizes_are_the_web_uis(name, tmp_path):
    """`Upscaler.upscale`: int(w*scale)//8*8, the built-in resize first, then LANCZOS to that."""
    up, img = Upscalers(tmp_path), image(100, 61)
    out = up.upscale(img, name, 2.5)
    assert out.size == (248, 152)
    first = img.resize((250, 152), Image.Resampling.LANCZOS if name != "Nearest" else Image.Resampling.NEAREST)
    expect = first if first.size == (248, 152) else first.resize((248, 152), Image.Resampling.LANCZOS)
    if name == "None":  # no step of its own: straight to the target
        expect = img.resize((248, 152), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(expect))


@needs_spandrel
def test_a_model_runs_as_often_as_the_scale_needs(tmp_path):
    """A x2 model asked for x3 runs twice (x4), then LANCZOS down; asked for x1.5 once."""
    root = tmp_path / "models"
    _write({"params": compact(num_conv=1)}, root / "RealESRGAN" / "compact_x2.pth")
    up = Upscalers(root, device="cpu", tile=32, overlap=8)
    seen = []
    out = up.upscale(image(40, 24), "compact_x2", 3, seen.append)
    assert out.size == (120, 72)
    # tiles: 40x24 -> 2x1, then 80x48 -> 3x2
    assert [p.done for p in seen] == list(range(1, 9)) and {p.total for p in seen} == {8}
    seen.clear()
    assert up.upscale(image(40, 24), "compact_x2", 1.5, seen.append).size == (56, 32) and len(seen) == 2
    with pytest.raises(SdlabError, match="more pixels than this server allows"):
        Upscalers(root, device="cpu", max_pixels=100 * 100).upscale(image(40, 24), "compact_x2", 4)


def test_extras_scale_to_with_crop_and_a_second_upscaler(tmp_path):
    up, img = Upscalers(tmp_path), image(64, 40)
    options = ExtrasUpscale("Lanczos", "Nearest", 0.25, resize_mode=1, upscale_to_width=150, upscale_to_height=150)
    out, info = upscale_extras(img, options, up)
    assert out.size == (150, 150)
    # upscale by max(150/64, 150/40) = 3.75 -> 240x144 (multiples of 8), pasted centred on black
    first = up.upscale(img, "Lanczos", 3.75)
    blend = Image.blend(first, up.upscale(img, "Nearest", 3.75), 0.25)
    canvas = Image.new("RGB", (150, 150))
    canvas.paste(first, (75 - 120, 75 - 72))
    assert first.size == (240, 144)
    assert np.asarray(out)[3:147].tolist() != np.asarray(canvas)[3:147].tolist()  # the blend changed it
    canvas.paste(blend, (75 - 120, 75 - 72))
    assert np.array_equal(np.asarray(out), np.asarray(canvas))
    assert postprocess_infotext(info) == ("Postprocess upscale to: 150x150, Postprocess crop to: 150x150, "
                                          "Postprocess upscaler: Lanczos, Postprocess upscaler 2: Nearest")


def test_extras_scale_by_and_none(tmp_path):
    up, img = Upscalers(tmp_path), image(64, 40)
    out, info = upscale_extras(img, ExtrasUpscale("Nearest", upscale_by=2), up)
    assert out.size == (128, 80) and postprocess_infotext(info) == ("Postprocess upscale by: 2, "
                                                                    "Postprocess upscaler: Nearest")
    out, info = upscale_extras(img, ExtrasUpscale("None", "Unknown"), up)  # None: nothing else is looked at
    assert out.size == img.size and info == {}
    with pytest.raises(SdlabError, match="no upscaler named 'Unknown'"):
        upscale_extras(img, ExtrasUpscale("Lanczos", "Unknown"), up)


@needs_spandrel
def test_files_that_are_not_upscalers_are_refused(tmp_path):
    bad = tmp_path / "ESRGAN"
    _write({"foo.weight": torch.zeros(3, 3)}, bad / "random.safetensors")
    (bad / "broken.pth").write_bytes(b"not a pickle")
    with pytest.raises(SdlabError, match="not an upscaler architecture spandrel knows"):
        load_upscaler_model(bad / "random.safetensors", "cpu")
    with pytest.raises(SdlabError, match="broken.pth"):
        load_upscaler_model(bad / "broken.pth", "cpu")


# -- sdlab upscale ---------------------------------------------------------------------------------

def test_cli_upscale_writes_the_png_with_both_texts(tmp_path, capsys):
    src = tmp_path / "in.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Seed: 1")
    image(48, 32).save(src, pnginfo=info)
    out = tmp_path / "out" / "big.png"
    assert main(["upscale", str(src), "--upscaler", "Lanczos", "--upscaler-2", "Nearest", "--visibility", "0.5",
                 "--scale", "2", "-o", str(out), "--models-dir", str(tmp_path)]) == 0
    result = Image.open(out)
    assert result.size == (96, 64) and result.info["parameters"] == "a cat\nSteps: 20, Seed: 1"
    assert result.info["postprocessing"] == ("Postprocess upscale by: 2, Postprocess upscaler: Lanczos, "
                                             "Postprocess upscaler 2: Nearest")
    assert "wrote" in capsys.readouterr().out
    assert main(["upscale", str(src), "-u", "Nearest", "--size", "100x50", "--models-dir", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "in-upscaled.png").size == (100, 50)


@pytest.mark.parametrize("argv, message", [
    (["missing.png", "-u", "Lanczos"], "missing.png: no such image file"),
    (["IN", "-u", "4x-Nothing"], "no upscaler named '4x-Nothing'"),
    (["IN", "-u", "Lanczos", "--size", "big"], "--size 'big': give WIDTHxHEIGHT"),
    (["IN", "-u", "Lanczos", "--scale", "0"], "the upscale factor must be above 0"),
    (["IN", "IN", "-u", "Lanczos", "-o", "one.png"], "2 images need an output folder"),
    (["IN", "-u", "Lanczos", "--tile", "16", "--overlap", "8"], "the overlap must be under half the tile"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, argv, message):
    src = tmp_path / "in.png"
    image(16, 16).save(src)
    argv = [str(src) if a == "IN" else str(tmp_path / a) if a == "missing.png" else a for a in argv]
    assert main(["upscale", *argv, "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("sdlab: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_scale_in_names_reads_as_the_web_ui_reads_it():
    from sdlab.upscalers import _SCALE_IN_NAME

    assert [re.search(_SCALE_IN_NAME, n) is not None for n in ("4x-UltraSharp", "RealESRGAN_x2plus", "anime")] == [
        True, True, False]
