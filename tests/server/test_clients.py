"""A real web UI client, unchanged, against a server on loopback: webuiapi (PyPI), whose calls send
every field with the client's own defaults (hr_upscaler="Latent", image_cfg_scale=1.5, s_tmax=0, ...)."""

from __future__ import annotations


import numpy as np
import pytest

webuiapi = pytest.importorskip("webuiapi")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import ServerSettings, parse_api_auth  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

from .live import serving  # noqa: E402


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    save_native(tiny_bundle("sd1"), root / "Stable-diffusion" / "tiny.safetensors")
    (root / "styles.csv").write_text("name,prompt,negative_prompt\nfilm,film grain,blurry\n")
    app = create_app(ServerSettings(models_dir=root, api_auth=parse_api_auth("alice:s3cret"),
                                    outputs_dir=tmp_path_factory.mktemp("outputs")))
    with serving(app) as port:
        yield port


@pytest.fixture(scope="module")
def api(port):
    return webuiapi.WebUIApi(host="127.0.0.1", port=port, username="alice", password="s3cret", steps=3)


def test_txt2img_and_img2img_with_the_clients_defaults(api):
    result = api.txt2img(prompt="a red circle", seed=7, width=32, height=32)
    assert result.image.size == (32, 32) and result.info["all_seeds"] == [7]
    assert result.info["infotexts"][0].startswith("a red circle\nSteps: 3, Sampler: Euler a, Schedule type: Automatic")
    again = api.txt2img(prompt="a red circle", seed=7, width=32, height=32)
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))

    init = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = api.img2img(images=[init], mask_image=mask, prompt="a blue square", seed=3, width=32, height=32,
                         inpainting_fill=1, mask_blur=0, denoising_strength=0.9)
    out = np.asarray(result.image.convert("RGB"))
    assert (out[:8] == (200, 30, 30)).all() and (out[8:24, 8:24] != (200, 30, 30)).any()


def test_what_sdlab_cannot_do_is_refused_not_ignored(api):
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", width=32, height=32, restore_faces=True)
    assert e.value.args[0] == 422 and "restore_faces=true: face restoration" in e.value.args[1]
    # ControlNet units are read (tests/server/test_controlnet_api.py); one naming a model the
    # folder lacks is refused, naming it, never run without its control.
    unit = webuiapi.ControlNetUnit(image=Image.new("RGB", (32, 32)), module="canny", model="control_canny")
    with pytest.raises(RuntimeError) as e:
        # (a dict of our own: webuiapi adds the unit to the dict it is given, its default one included)
        api.txt2img(prompt="x", width=32, height=32, controlnet_units=[unit], alwayson_scripts={})
    assert e.value.args[0] == 422 and "ControlNet model 'control_canny' not found" in e.value.args[1]


def test_the_listings_the_client_reads(api):
    """webuiapi's listing calls return the web UI's shapes (before, several were 404 {"detail": "Not
    Found"}), and its check for extensions, which reads scripts["txt2img"], finds none of those it
    looks for (sdlab's ControlNet is listed as "controlnet"; webuiapi looks for "controlnet m2m")."""
    for get in (api.get_upscalers, api.get_latent_upscale_modes, api.get_sd_vae, api.get_prompt_styles,
                api.get_hypernetworks, api.get_face_restorers, api.get_realesrgan_models, api.get_loras,
                api.get_samplers, api.get_schedulers, api.get_sd_models):
        assert isinstance(get(), list), get.__name__
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert len(api.get_latent_upscale_modes()) == 6
    assert api.get_prompt_styles() == [{"name": "film", "prompt": "film grain", "negative_prompt": "blurry"}]
    assert "prompt matrix" in api.get_scripts()["txt2img"] and "outpainting mk2" in api.get_scripts()["img2img"]
    api.check_extensions()
    assert (api.has_controlnet, api.has_adetailer, api.has_animatediff) == (False, False, False)
    assert api.get_cmd_flags()["api"] is True and set(api.get_embeddings()) == {"loaded", "skipped"}
    assert set(api.get_memory()) == {"ram", "cuda"}
    with pytest.raises(RuntimeError) as e:
        api.interrogate(Image.new("RGB", (32, 32)))
    assert e.value.args[0] == 501 and "interrogate (model 'clip') is not implemented by sdlab" in e.value.args[1]


def test_styles_tiling_and_save_images_as_the_client_sends_them(api):
    result = api.txt2img(prompt="a cat", styles=["film"], tiling=True, save_images=True, seed=2, width=32, height=32)
    assert result.info["infotexts"][0].startswith("a cat, film grain\nNegative prompt: blurry\n")
    assert "Tiling: True" in result.info["infotexts"][0] and result.info["styles"] == ["film"]
    assert len(result.info["saved_images"]) == 1 and result.info["saved_images"][0].endswith("-2.png")
