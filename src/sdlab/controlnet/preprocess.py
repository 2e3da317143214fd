"""ControlNet preprocessors: hint images made from input images, named and parametrised as the
sd-webui-controlnet extension's modules (its `/controlnet/module_list` names, slider labels,
ranges and defaults; Mikubill/sd-webui-controlnet 56cec5b, `scripts/preprocessor/`).

Each image operation is a plain function of a PIL image or a uint8 numpy array (H, W[, C]) that
returns a uint8 (H, W, 3) array; the image maths is OpenCV's (`pip install "sdlab[controlnet]"`),
imported when a preprocessor first runs. `PREPROCESSORS` is the registry the API's `module` names
index; preprocessors that run an annotator network (depth, openpose, hed, mlsd, ...) are listed
there too and answer with the file they need, since sdlab does not run annotator networks yet:
a depth map or pose image made elsewhere is used with module "none".

Most preprocessors first scale the image so its short side is the processor resolution and pad
it to a multiple of 64 with its edge pixels (the extension's `resize_image_with_pad`), then crop
the result back: the hint has the resized image's size, not the input's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
from PIL import Image

from sdlab.errors import SdlabError
from sdlab.optional import require

ImageLike = Image.Image | np.ndarray

ANNOTATOR_DIR = "models/ControlNet/annotators"


def _cv2() -> ModuleType:
    return require("cv2", extra="controlnet", purpose="ControlNet preprocessors")


# ---------------------------------------------------------------------------------------------
# Helpers


def to_hwc3(image: ImageLike) -> np.ndarray:
    """A uint8 (H, W, 3) array of any image, as the extension's HWC3: grey is repeated into three
    channels and RGBA is composited onto white."""
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        image = np.asarray(image)
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise SdlabError(f"a preprocessor needs an 8-bit image, not {x.dtype} pixels")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise SdlabError(f"a preprocessor needs a grey, RGB or RGBA image, not an array of shape {x.shape}")
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    if x.shape[2] == 4:
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (x[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x


def resize_image_with_pad(image: ImageLike, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The image scaled so its short side is `resolution` (cubic up, area down), edge-padded to
    a multiple of 64; and the function that crops a result back to the scaled size."""
    cv2 = _cv2()
    img = to_hwc3(image)
    h, w = img.shape[:2]
    k = float(resolution) / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(img, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:th, :tw])

    return np.ascontiguousarray(padded), remove_pad


def _grey_to_rgb(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(x[:, :, None], 3, axis=2)) if x.ndim == 2 else x


# ---------------------------------------------------------------------------------------------
# Image operations


def none(image: ImageLike) -> np.ndarray:
    """The image as it is (a hint made elsewhere: a depth map, a pose, edges)."""
    return to_hwc3(image)


def invert(image: ImageLike) -> np.ndarray:
    """255 - image, at the input's size: black lines on white become the white-on-black hints the
    models were trained on."""
    return 255 - to_hwc3(image)


def canny(image: ImageLike, resolution: int = 512, low_threshold: float = 100,
          high_threshold: float = 200) -> np.ndarray:
    """OpenCV's Canny edges of the resized image, run on its three channels (not greyscale first, as the extension)."""
    cv2 = _cv2()
    img, remove_pad = resize_image_with_pad(image, resolution)
    return _grey_to_rgb(remove_pad(cv2.Canny(img, int(low_threshold), int(high_threshold))))


def threshold(image: ImageLike, resolution: int = 512, binarization_threshold: float = 127) -> np.ndarray:
    """White where every channel is above the threshold, black elsewhere."""
    img, remove_pad = resize_image_with_pad(image, resolution)
    out = np.zeros_like(img)
    out[img.min(axis=2) > binarization_threshold] = 255
    return remove_pad(out)


def scribble_xdog(image: ImageLike, resolution: int = 512, xdog_threshold: float = 32) -> np.ndarray:
    """Scribbles from a difference of Gaussians (sigmas 0.5 and 5), thresholded."""
    cv2 = _cv2()
    img, remove_pad = resize_image_with_pad(image, resolution)
    x = img.astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2))
    dog = dog.clip(0, 255).astype(np.uint8)
    out = np.zeros_like(img)
    out[2 * (255 - dog) > xdog_threshold] = 255
    return remove_pad(out)


def tile_resample(image: ImageLike, down_sampling_rate: float = 1.0) -> np.ndarray:
    """The input shrunk by the rate (area resampling) for the tile model; rates below 1.1 keep it as it is."""
    cv2 = _cv2()
    img = to_hwc3(image)
    if down_sampling_rate < 1.1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (int(w / down_sampling_rate), int(h / down_sampling_rate)), interpolation=cv2.INTER_AREA)


def lineart_standard(image: ImageLike, resolution: int = 512) -> np.ndarray:
    """Line art without a network: how much darker each pixel is than its blurred (sigma 6)
    surroundings, scaled by the median of the clear lines."""
    cv2 = _cv2()
    img, remove_pad = resize_image_with_pad(image, resolution)
    x = img.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(lines)) if lines.size else 0.0)  # an empty median is nan: no lines
    intensity *= 127
    return _grey_to_rgb(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


def blur_gaussian(image: ImageLike, resolution: int = 512, sigma: float = 9.0) -> np.ndarray:
    """The resized image blurred (the tile model's blur input)."""
    cv2 = _cv2()
    img, remove_pad = resize_image_with_pad(image, resolution)
    return cv2.GaussianBlur(remove_pad(img), (0, 0), float(sigma))


def color(image: ImageLike, resolution: int = 512) -> np.ndarray:
    """The T2I colour adapter's grid: the image at 1/64 of its size (cubic), blown up to blocks."""
    cv2 = _cv2()
    img = to_hwc3(image)
    h, w = img.shape[:2]
    if h < w:
        size = (int(round(w / h * resolution)), resolution)
    else:
        size = (resolution, int(round(h / w * resolution)))
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // 64), max(1, h // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def shuffle(image: ImageLike, resolution: int = 512, seed: int | None = None) -> np.ndarray:
    """The content shuffle: the image warped by a smooth random flow field (the shuffle model's input).

    Random as in the extension; `seed` makes it repeatable.
    """
    cv2 = _cv2()
    img, remove_pad = resize_image_with_pad(image, resolution)
    img = remove_pad(img)
    h, w = img.shape[:2]
    rng = np.random.default_rng(seed)

    def noise_disk(f: int = 256) -> np.ndarray:
        n = rng.uniform(0, 1, size=(h // f + 2, w // f + 2))
        n = cv2.resize(n, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
        n -= n.min()
        return n / n.max()

    flow = np.stack([noise_disk() * (w - 1), noise_disk() * (h - 1)], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


def _recolor(image: ImageLike, gamma_correction: float, conversion: str, channel: int) -> np.ndarray:
    cv2 = _cv2()
    # The extension converts from "BGR" though its images are RGB; kept, as the models saw that.
    x = cv2.cvtColor(to_hwc3(image), getattr(cv2, conversion))[:, :, channel].astype(np.float32) / 255.0
    return _grey_to_rgb(((x ** gamma_correction) * 255.0).clip(0, 255).astype(np.uint8))


def recolor_luminance(image: ImageLike, gamma_correction: float = 1.0) -> np.ndarray:
    """The L channel of CIELAB, gamma-corrected, in grey (the recolor model's input)."""
    return _recolor(image, gamma_correction, "COLOR_BGR2LAB", 0)


def recolor_intensity(image: ImageLike, gamma_correction: float = 1.0) -> np.ndarray:
    """The V channel of HSV, gamma-corrected, in grey (the recolor model's input)."""
    return _recolor(image, gamma_correction, "COLOR_BGR2HSV", 2)


def inpaint(image: ImageLike, mask: ImageLike | None = None) -> np.ndarray:
    """The inpaint ControlNet's input: RGBA, alpha 255 where the mask is white (> 127), to be
    repainted; an RGBA image's own alpha is the mask when none is given. `inpaint_hint` makes
    the model's hint of it."""
    x = np.asarray(image.convert("RGBA") if isinstance(image, Image.Image) and "A" in image.getbands() else image)
    has_alpha = x.ndim == 3 and x.shape[2] == 4
    rgb = np.ascontiguousarray(x[:, :, :3]) if has_alpha else to_hwc3(image)
    if mask is not None:
        m = to_hwc3(mask)[:, :, 0]
    elif has_alpha:
        m = x[:, :, 3]
    else:
        raise SdlabError("the inpaint preprocessors need a mask (white: repaint) or an RGBA image")
    if m.shape != rgb.shape[:2]:
        raise SdlabError(f"the mask is {m.shape[1]}x{m.shape[0]} and the image {rgb.shape[1]}x{rgb.shape[0]}; "
                         "give a mask of the image's size")
    alpha = np.where(m > 127, 255, 0).astype(np.uint8)
    return np.concatenate([rgb, alpha[:, :, None]], axis=2)


inpaint_only = inpaint  # the same input; "inpaint_only" also pastes the original back outside the mask afterwards


def inpaint_hint(rgba: np.ndarray) -> np.ndarray:
    """The inpaint models' hint of an RGBA input: RGB in [0, 1], -1 where masked
    (`c * (1 - m) - m`, the extension's hook.py), float32 (H, W, 3)."""
    c = rgba[:, :, :3].astype(np.float32) / 255.0
    m = (rgba[:, :, 3:4].astype(np.float32) / 255.0 > 0.5).astype(np.float32)
    return c * (1 - m) - m


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's parameters as the extension's API describes it (`module_detail`)."""

    label: str
    value: float
    minimum: float
    maximum: float
    step: float = 0.01  # the extension's PreprocessorParameter default

    def api_json(self) -> dict:
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}

    def resolve(self, given: float | None) -> float:
        """The extension's bound check: None, -1 or a value outside the range means the default."""
        return self.value if given is None or not self.minimum <= given <= self.maximum else given


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Preprocessor:
    """A module of the extension: its API name, UI label, and what runs it.

    `run` takes the image and then the resolution (when `resolution` is a slider) and the
    sliders' values as positional arguments; None means an annotator network this code does not
    run, whose files are `annotator_files`.
    """

    name: str
    label: str
    run: Callable[..., np.ndarray] | None
    resolution: Slider | None = RESOLUTION  # None: hidden (the preprocessor ignores it)
    sliders: tuple[Slider, ...] = ()  # threshold_a, threshold_b
    priority: int = 0  # the extension's sorting_priority (higher first in the module list)
    tags: tuple[str, ...] = ()
    annotator_files: tuple[str, ...] = ()
    needs_mask: bool = False
    model_free: bool = False
    extra: dict = field(default_factory=dict)  # fixed keyword arguments of `run`

    @property
    def available(self) -> bool:
        return self.run is not None

    def detail(self) -> dict:
        """The entry of `/controlnet/module_list`'s `module_detail`."""
        sliders = ([self.resolution] if self.resolution else []) + list(self.sliders)
        return {"model_free": self.model_free, "sliders": [s.api_json() for s in sliders]}

    def __call__(self, image: ImageLike, processor_res: float | None = None, threshold_a: float | None = None,
                 threshold_b: float | None = None, mask: ImageLike | None = None) -> np.ndarray:
        """Run it with the API's parameters (-1 or None: the default; values out of range: the
        default, as the extension).

        Raises:
            SdlabError: an annotator preprocessor, or an inpaint one without a mask.
        """
        if self.run is None:
            files = " and ".join(self.annotator_files)
            raise SdlabError(f"the {self.name!r} preprocessor needs the annotator file {files} in {ANNOTATOR_DIR} "
                             "and a network sdlab does not run yet; make the map with another tool and use it "
                             "with module \"none\"")
        args: list[float] = []
        if self.resolution is not None:
            args.append(int(self.resolution.resolve(processor_res)))
        args += [s.resolve(v) for s, v in zip(self.sliders, (threshold_a, threshold_b))]
        if self.needs_mask:
            return self.run(image, mask, **self.extra)
        return self.run(image, *args, **self.extra)


def _annotator(name: str, label: str, files: tuple[str, ...], tags: tuple[str, ...], priority: int = 0,
               sliders: tuple[Slider, ...] = (), resolution: Slider | None = RESOLUTION) -> Preprocessor:
    return Preprocessor(name, label, None, resolution, sliders, priority, tags, annotator_files=files)


_MIDAS = ("dpt_hybrid-midas-501f0c75.pt",)
_BODY, _HAND, _FACE = "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
_LERES = (Slider("Remove Near %", 0, 0, 100, 0.1), Slider("Remove Background %", 0, 0, 100, 0.1))

_ALL = [
    # The extension shows a resolution slider for "none" that nothing reads.
    Preprocessor("none", "none", lambda img, res: none(img), priority=10, tags=("InstructP2P",)),
    Preprocessor("invert", "invert (from white bg & black line)", invert, None, priority=20,
                 tags=("Canny", "Lineart", "Scribble", "MLSD")),
    Preprocessor("canny", "canny", canny, sliders=(Slider("Low Threshold", 100, 1, 255, 1),
                                                    Slider("High Threshold", 200, 1, 255, 1)),
                 priority=100, tags=("Canny",)),
    Preprocessor("threshold", "threshold", threshold, sliders=(Slider("Binarization Threshold", 127, 0, 255),)),
    Preprocessor("scribble_xdog", "scribble_xdog", scribble_xdog, sliders=(Slider("XDoG Threshold", 32, 1, 64),),
                 tags=("Scribble", "SparseCtrl")),
    Preprocessor("tile_resample", "tile_resample", lambda img, res, rate: tile_resample(img, rate),
                 sliders=(Slider("Down Sampling Rate", 1.0, 1.0, 8.0),), priority=100, tags=("Tile",)),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", lineart_standard,
                 priority=100, tags=("Lineart",)),
    Preprocessor("blur_gaussian", "blur_gaussian", blur_gaussian, sliders=(Slider("Sigma", 9.0, 0.01, 64.0),),
                 tags=("Tile",)),
    Preprocessor("color", "t2ia_color_grid", color, tags=("T2I-Adapter",)),
    Preprocessor("shuffle", "shuffle", shuffle, None, priority=100, tags=("Shuffle",), extra={"resolution": 512}),
    Preprocessor("recolor_luminance", "recolor_luminance", lambda img, res, g: recolor_luminance(img, g),
                 sliders=(Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001),), priority=100, tags=("Recolor",)),
    Preprocessor("recolor_intensity", "recolor_intensity", lambda img, res, g: recolor_intensity(img, g),
                 sliders=(Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001),), tags=("Recolor",)),
    Preprocessor("inpaint", "inpaint_global_harmonious", inpaint, None, tags=("Inpaint",), needs_mask=True),
    Preprocessor("inpaint_only", "inpaint_only", inpaint_only, None, priority=100, tags=("Inpaint",),
                 needs_mask=True),
    # Annotator networks: listed, with the files the extension downloads for them.
    _annotator("depth", "depth_midas", _MIDAS, ("Depth",), 100),
    _annotator("depth_leres", "depth_leres", ("res101.pth",), ("Depth",), sliders=_LERES),
    _annotator("depth_leres++", "depth_leres++", ("res101.pth", "latest_net_G.pth"), ("Depth",), sliders=_LERES),
    _annotator("depth_zoe", "depth_zoe", ("ZoeD_M12_N.pt",), ("Depth",)),
    _annotator("depth_anything", "depth_anything", ("depth_anything_vitl14.pth",), ("Depth",)),
    _annotator("depth_anything_v2", "depth_anything_v2", ("depth_anything_v2_vitl.safetensors",), ("Depth",)),
    _annotator("normal_map", "normal_midas", _MIDAS, ("NormalMap",),
               sliders=(Slider("Normal Background Threshold", 0.4, 0.0, 1.0),)),
    _annotator("normal_bae", "normal_bae", ("scannet.pt",), ("NormalMap",), 100),
    _annotator("openpose", "openpose", (_BODY,), ("OpenPose",)),
    _annotator("openpose_face", "openpose_face", (_BODY, _FACE), ("OpenPose",)),
    _annotator("openpose_faceonly", "openpose_faceonly", (_FACE,), ("OpenPose",)),
    _annotator("openpose_full", "openpose_full", (_BODY, _HAND, _FACE), ("OpenPose",), 100),
    _annotator("openpose_hand", "openpose_hand", (_BODY, _HAND), ("OpenPose",)),
    _annotator("dw_openpose_full", "dw_openpose_full", ("yolox_l.onnx", "dw-ll_ucoco_384.onnx"), ("OpenPose",)),
    _annotator("animal_openpose", "animal_openpose",
               ("yolox_l.onnx", "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx"),
               ("OpenPose",)),
    _annotator("densepose", "densepose (pruple bg & purple torso)", ("densepose_r50_fpn_dl.torchscript",),
               ("OpenPose",)),
    _annotator("densepose_parula", "densepose_parula (black bg & blue torso)", ("densepose_r50_fpn_dl.torchscript",),
               ("OpenPose",)),
    _annotator("hed", "softedge_hed", ("ControlNetHED.pth",), ("SoftEdge",)),
    _annotator("hed_safe", "softedge_hedsafe", ("ControlNetHED.pth",), ("SoftEdge",)),
    _annotator("pidinet", "softedge_pidinet", ("table5_pidinet.pth",), ("SoftEdge",), 100),
    _annotator("pidinet_safe", "softedge_pidisafe", ("table5_pidinet.pth",), ("SoftEdge",)),
    _annotator("softedge_teed", "softedge_teed", ("7_model.pth",), ("SoftEdge",),
               sliders=(Slider("Safe Steps", 2, 0, 10, 1),)),
    _annotator("scribble_hed", "scribble_hed", ("ControlNetHED.pth",), ("Scribble", "SparseCtrl")),
    _annotator("pidinet_scribble", "scribble_pidinet", ("table5_pidinet.pth",), ("Scribble", "SparseCtrl"), 100),
    _annotator("pidinet_sketch", "t2ia_sketch_pidi", ("table5_pidinet.pth",), ("T2I-Adapter",)),
    _annotator("mlsd", "mlsd", ("mlsd_large_512_fp32.pth",), ("MLSD",), 100,
               sliders=(Slider("MLSD Value Threshold", 0.1, 0.01, 2.0),
                        Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0))),
    _annotator("lineart", "lineart_realistic", ("sk_model.pth",), ("Lineart",)),
    _annotator("lineart_coarse", "lineart_coarse", ("sk_model2.pth",), ("Lineart",)),
    _annotator("lineart_anime", "lineart_anime", ("netG.pth",), ("Lineart",)),
    _annotator("lineart_anime_denoise", "lineart_anime_denoise", ("erika.pth",), ("Lineart",)),
    _annotator("segmentation", "seg_ufade20k", ("upernet_global_small.pth",), ("Segmentation",)),
    _annotator("oneformer_coco", "seg_ofcoco", ("150_16_swin_l_oneformer_coco_100ep.pth",), ("Segmentation",)),
    _annotator("oneformer_ade20k", "seg_ofade20k", ("250_16_swin_l_oneformer_ade20k_160k.pth",), ("Segmentation",),
               100),
    _annotator("anime_face_segment", "seg_anime_face", ("UNet.pth",), ("Segmentation",)),
    _annotator("inpaint_only+lama", "inpaint_only+lama", ("ControlNetLama.pth",), ("Inpaint",), resolution=None),
]

PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in _ALL}
_BY_LABEL = {p.label: p for p in _ALL}


def get_preprocessor(module: str) -> Preprocessor:
    """A preprocessor by its API name or UI label (the extension accepts both).

    Raises:
        SdlabError: an unknown module.
    """
    found = _BY_LABEL.get(module) or PREPROCESSORS.get(module)
    if found is None:
        raise SdlabError(f"unknown ControlNet preprocessor (module) {module!r}; known: {', '.join(module_names())}")
    return found


def module_names(alias_names: bool = False) -> list[str]:
    """The `/controlnet/module_list` order: "none" first, then by priority and label, descending."""
    rest = sorted((p for p in _ALL if p.name != "none"), key=lambda p: str(p.priority).zfill(8) + p.label,
                  reverse=True)
    return [p.label if alias_names else p.name for p in [PREPROCESSORS["none"], *rest]]


def module_detail(alias_names: bool = False) -> dict[str, dict]:
    """`/controlnet/module_list`'s `module_detail`: each module's sliders (API `Slider.api_json`)."""
    return {name: get_preprocessor(name).detail() for name in module_names(alias_names)}
