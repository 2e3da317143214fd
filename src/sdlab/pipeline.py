"""txt2img, img2img and inpainting on a loaded Bundle.

Every face of sdlab (Python, CLI, HTTP, web page) builds one `GenerationRequest` and calls
`Pipeline.generate` (or `Pipeline.batches`); none holds generation logic of its own. The
pipeline holds what stays loaded between requests (the model, its refiner, LoRAs, embeddings,
styles) and runs the web UI's recipe (`recipes.webui`) over the generation steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ._version import __version__
from .checkpoints.loader import Bundle
from .device import dtype_name, vae_dtype
from .controlnet.units import ControlNets, ControlRequest, detected_map, infotext_line
from .embeddings import EmbeddingLibrary
from .hires import hires_infotext
from .infotext import create_infotext, with_infotext
from .lora import LoraSpec, LoraState, lora_specs
from .models.layers import circular_padding
from .models.storage import storage_dtype
from .models_dir import ModelsDir
from .perf import text_encoder_parking
from .recipes import webui
from .recipes.sd3 import check_flow_fields, sd3_infotext
from .request import GenerationRequest, GenerationResult, Interrupted, Progress, validate
from .sampling.samplers import resolve_sampler
from .sampling.schedules import SCHEDULES, resolve_schedule
from .styles import STYLES_FILE, apply_styles
from .text.conditioning import TextEncoderRunner
from .text.prompt import extract_extra_networks

__all__ = ["GenerationRequest", "GenerationResult", "Interrupted", "Pipeline", "Progress", "text_runners"]

log = logging.getLogger(__name__)

def _wxh(hw: tuple[int, int]) -> str:
    """(height, width) or (top, left) as the CLI writes it: WxH, LEFTxTOP."""
    return f"{hw[1]}x{hw[0]}"


def text_runners(bundle: Bundle) -> list[TextEncoderRunner]:
    from .checkpoints.sd3 import absent_clip_zeros
    from .text.conditioning import ZeroFilledRunner
    from .text.t5_runner import T5Runner

    fam = bundle.family
    zeros = absent_clip_zeros(bundle.config)  # SD3 with one CLIP: where the other's zeros go

    def clip_runner(te, tok) -> TextEncoderRunner:
        if zeros is not None:
            return ZeroFilledRunner(te, tok, zeros, base_skip=fam.clip_skip, final_norm=fam.text_final_norm)
        return TextEncoderRunner(te, tok, base_skip=fam.clip_skip, final_norm=fam.text_final_norm)

    return [T5Runner(te, tok) if slot.layout == "t5" else clip_runner(te, tok)
            for slot, te, tok in zip(fam.text_encoders, bundle.text_encoders, bundle.tokenizers)]


class Pipeline:
    """Generation on one loaded model. Keep it around: the model stays loaded and the
    conditioning of an unchanged prompt is cached between requests.

    Args:
        bundle: the loaded model.
        refiner: an SDXL refiner for the last part of the steps.
        models: the models folder where LoRAs and embeddings are found by name (web UI layout).
        styles_file: the web UI's styles.csv; by default the models folder's.
        vae_info: the infotext's "VAE hash" / "VAE" of a separate VAE file the bundle was loaded with.
    """

    def __init__(self, bundle: Bundle, refiner: Bundle | None = None, models: ModelsDir | None = None,
                 styles_file: str | Path | None = None, vae_info: dict[str, str] | None = None):
        self.bundle = bundle
        self.text = text_runners(bundle)
        # On a GPU the text encoders wait in CPU memory between prompts (`perf.TextEncoderParking`).
        self.text_parking = text_encoder_parking(bundle)
        self.models = models if models is not None else ModelsDir()
        self.loras = LoraState()
        self.embeddings = EmbeddingLibrary(self.models.folder("embedding"))
        self.controlnets = ControlNets(self.models.root)
        self.vae_info = dict(vae_info or {})
        # The styles a request names (the web UI's styles.csv); read at each request that names one.
        self.styles_file = Path(styles_file) if styles_file is not None else self.models.root / STYLES_FILE
        _vae_in_fp32_on_cpu(bundle)
        self.set_refiner(refiner)
        self.upscalers = None  # the hires fix's image upscalers (`recipes.hires.upscalers_of`), made on first use

    def use_vae(self, path: Path) -> None:
        """Decode and encode with a separate VAE file (the web UI's "SD VAE"), named in the infotext."""
        from .models_dir import load_vae_into

        load_vae_into(self.bundle, path)
        _vae_in_fp32_on_cpu(self.bundle)
        self.vae_info = {"VAE hash": self.models.short_hash(path), "VAE": path.stem}

    def zero_terminal_snr(self, req: GenerationRequest) -> bool:
        """Whether `req` samples on the zero-terminal-SNR schedule."""
        return self.bundle.family.zero_terminal_snr if req.zero_terminal_snr is None else req.zero_terminal_snr

    def set_refiner(self, refiner: Bundle | None) -> None:
        """Use (or stop using) an SDXL refiner for the last part of the steps."""
        self.refiner = refiner
        self.refiner_text = text_runners(refiner) if refiner is not None else []
        self.refiner_text_parking = text_encoder_parking(refiner) if refiner is not None else None
        # The LoRAs of a request reach the refiner too, as far as they fit it (the web UI's way).
        self.refiner_loras = LoraState()

    def park_text_encoders(self) -> None:
        """Send the text encoders (the refiner's too) to CPU memory until a prompt needs them, unless
        their parking's `keep()` says the next request will (a no-op on the CPU)."""
        for parking in (self.text_parking, self.refiner_text_parking):
            if parking is not None:
                parking.park()

    def models_in_use(self, req: GenerationRequest, embeddings: list[list[dict]]
                      ) -> list[tuple[Bundle, list[TextEncoderRunner], list[dict]]]:
        """(model, its text encoders, their embeddings) of each sampling pass of `req`: the model,
        then the refiner when one is loaded and the request switches to it."""
        out = [(self.bundle, self.text, embeddings[0])]
        if self.refiner is not None and req.refiner_switch_at is not None and req.refiner_switch_at < 1.0:
            out.append((self.refiner, self.refiner_text, embeddings[1]))
        return out

    # -- the Python API --------------------------------------------------

    def txt2img(self, prompt: str, **params) -> list[Image.Image]:
        return self.generate(GenerationRequest(prompt=prompt, **params)).images

    def img2img(self, init_image: Image.Image, prompt: str, **params) -> list[Image.Image]:
        return self.generate(GenerationRequest(prompt=prompt, init_image=init_image, **params)).images

    def inpaint(self, init_image: Image.Image, mask: Image.Image, prompt: str, **params) -> list[Image.Image]:
        params.setdefault("denoising_strength", 1.0)
        return self.generate(GenerationRequest(prompt=prompt, init_image=init_image, mask=mask, **params)).images

    # -- the one generation path ------------------------------------------

    def generate(self, req: GenerationRequest, callback: Callable[[Progress], None] | None = None) -> GenerationResult:
        """All the request's images (`n_iter` batches); a callback that raises `Interrupted`
        stops the generation with the images so far."""
        parts = []
        for part in self.batches(req, callback):
            parts.append(part)
            if part.interrupted:
                break
        req = parts[0].request
        return GenerationResult([i for p in parts for i in p.images], [t for p in parts for t in p.infotexts],
                                [s for p in parts if p.images for s in p.seeds],
                                [s for p in parts if p.images for s in p.subseeds], req,
                                any(p.interrupted for p in parts), parts[0].detected_maps)

    def batches(self, req: GenerationRequest, callback: Callable[[Progress], None] | None = None
                ) -> Iterator[GenerationResult]:
        """The request's batches one by one, each as its own result (with `interrupted` when the
        callback stopped it). A caller may go on after a stopped batch, as the web UI's "skip"
        does; seeds continue as one run numbers them."""
        req = apply_styles(validate(req, self.bundle.family.default_size, self.bundle.family.size_multiple),
                           self.styles_file)
        check_flow_fields(req, self.bundle.family)  # shift / SLG: SD3's only
        prompt, networks = extract_extra_networks(req.prompt)
        negative, _ = extract_extra_networks(req.negative_prompt)  # the web UIs apply only the prompt's
        specs = lora_specs(networks, self.models.resolve_lora)
        embeddings = self.embeddings_for(prompt, negative)
        self._set_loras(specs)
        extras = self._extra_infotext(specs, prompt + " " + negative)
        sampler = resolve_sampler(req.sampler)
        schedule = resolve_schedule(req.schedule).name
        if schedule == "automatic":
            schedule = sampler.default_schedule or "automatic"
        controls = self.controlnets.units(req.controls, self.bundle, req.width, req.height, req.init_image,
                                          hires=req.enable_hr and req.init_image is None)
        extras.update(_control_infotext(req.controls))
        maps = [detected_map(unit) for unit in controls]
        run = webui.prepare(self, req, prompt, negative, sampler, schedule, embeddings, controls)
        self.park_text_encoders()  # the prompts are encoded: the GPU is the denoiser's while it samples
        tiled = [b.unet for b, _, _ in self.models_in_use(req, embeddings)] + [self.bundle.vae]
        with circular_padding(*tiled, enabled=req.tiling):
            for batch in webui.batches(self, run, callback):
                infotexts = [self.infotext(req, sampler.name, schedule, seed, subseed, extras, position=i,
                                           stopped=batch.stopped)
                             for i, (seed, subseed) in enumerate(zip(batch.seeds, batch.subseeds))]
                # `image.save("out.png")` keeps the infotext.
                images = [with_infotext(img, info) for img, info in zip(batch.images, infotexts)]
                yield GenerationResult(images, infotexts[:len(images)], batch.seeds, batch.subseeds, req,
                                       batch.stopped is not None, maps)

    def infotext(self, req: GenerationRequest, sampler: str, schedule: str, seed: int, subseed: int,
                 extras: dict[str, str] | None = None, position: int = 0,
                 stopped: tuple[int, int] | None = None) -> str:
        """The web UI's infotext of one image (`position` in its batch), then sdlab's own keys
        for what else decides its pixels (`replay_infotext`). `stopped`: (steps done, steps the
        sampler had to run) of an image interrupted before its last step."""
        params: dict[str, object] = {
            "Steps": req.steps, "Sampler": sampler, "Schedule type": SCHEDULES[schedule].label,
            "CFG scale": req.cfg_scale, "Seed": seed, "Size": f"{req.width}x{req.height}",
            "Model hash": self.bundle.short_hash, "Model": self.bundle.name, **self.vae_info,
        }
        if req.subseed_strength:
            params["Variation seed"] = subseed
            params["Variation seed strength"] = req.subseed_strength
        if req.mode != "txt2img":
            params["Denoising strength"] = req.denoising_strength
        if req.clip_skip > 1:
            params["Clip skip"] = req.clip_skip
        params["RNG"] = "NV" if req.rng == "nv" else "CPU"
        if req.tiling:
            params["Tiling"] = "True"  # the web UI's key and value
        if req.guidance_rescale:
            params["CFG rescale phi"] = req.guidance_rescale
        default_eta = resolve_sampler(sampler).default_eta
        if req.eta is not None and default_eta is not None and req.eta != default_eta:
            params["Eta DDIM" if sampler == "DDIM" else "Eta"] = req.eta  # the web UI's keys
        if self.zero_terminal_snr(req):
            params["Noise Schedule"] = "Zero Terminal SNR"
        params.update(sd3_infotext(req, self.bundle.family))  # Shift, SLG
        if req.mode == "inpaint":
            params["Mask blur"] = req.mask_blur
            if req.inpaint_full_res:
                params["Inpaint area"] = "Only masked"
                params["Masked area padding"] = req.inpaint_full_res_padding
        params.update(hires_infotext(req, sampler, params["Schedule type"]))
        params.update(extras or {})
        if self.refiner is not None and req.refiner_switch_at is not None and req.refiner_switch_at < 1.0:
            params["Refiner"] = req.refiner_checkpoint or self.refiner.name
            params["Refiner switch at"] = req.refiner_switch_at
        params.update(self.replay_infotext(req, position))
        if stopped is not None and stopped[0] < stopped[1]:  # stopped at the last step: nothing is missing
            # Steps still names the schedule the image was sampled on; this says it stopped part-way
            # (the web UI writes nothing, and its unfinished images pass for finished ones).
            params["Interrupted at step"] = f"{stopped[0]}/{stopped[1]}"
        params["Version"] = f"sdlab {__version__}"
        return create_infotext(req.prompt, req.negative_prompt, params)

    def replay_infotext(self, req: GenerationRequest, position: int = 0) -> dict[str, object]:
        """sdlab's own infotext keys: what else changes an image's pixels on the same machine and
        the web UIs' keys do not record, so that `sdlab generate --from` can make it again byte for
        byte (`generate_cli.replay_settings` reads them back). The web UIs skip keys they do not
        know. Each is written only when a replay could get it wrong otherwise."""
        b = self.bundle
        # The compute dtype always: its default differs between machines (bf16 on AVX512-BF16 / AMX
        # CPUs, fp32 on others, fp16 on GPUs), and fp32 and bf16 differ by a few levels per pixel.
        params: dict[str, object] = {"sdlab dtype": dtype_name(b.dtype)}
        # Weights stored narrower than they compute are rounded, which changes nothing only when
        # the file already held them that narrow; whether it did is not known here.
        weights = storage_dtype(b.unet)
        if weights != b.dtype:
            params["sdlab weights"] = dtype_name(weights)
        # The VAE follows the compute dtype (`device.vae_dtype`) until an fp16 VAE overflows and
        # runs wider from then on (`perf.decode_latents`), for the images after it too.
        vae = next(b.vae.parameters()).dtype
        if vae != vae_dtype(b.device, b.dtype, b.family.name):
            params["sdlab VAE dtype"] = dtype_name(vae)
        if b.prediction_forced:  # `--prediction`: detection would give the file's own again
            params["sdlab prediction"] = b.prediction
        if b.family.zero_terminal_snr and not self.zero_terminal_snr(req):
            # The web UI's key says only "on"; without this a replay would follow the model's marker.
            params["sdlab zero terminal SNR"] = "off"
        if req.batch_size > 1:
            # An image computed in a batch differs by a level here and there from the same seed
            # computed alone (the kernels block the work differently): a replay runs the whole batch.
            params["sdlab batch size"] = req.batch_size
            params["sdlab batch pos"] = position
        if b.family.added_conditioning is not None:
            # SDXL's size and aesthetic conditioning, which the web UIs leave at their defaults.
            own = (req.height, req.width)
            if req.original_size not in (None, own):
                params["sdlab original size"] = _wxh(req.original_size)
            if req.target_size not in (None, own):
                params["sdlab target size"] = _wxh(req.target_size)
            if req.crop_top_left != GenerationRequest.crop_top_left:
                params["sdlab crop"] = _wxh(req.crop_top_left)
            if req.aesthetic_score != GenerationRequest.aesthetic_score:
                params["sdlab aesthetic score"] = req.aesthetic_score
            if req.negative_aesthetic_score != GenerationRequest.negative_aesthetic_score:
                params["sdlab negative aesthetic score"] = req.negative_aesthetic_score
        return params

    # -- internals ----------------------------------------------------------

    def embeddings_for(self, prompt: str, negative: str) -> list[list[dict[str, Tensor]]]:
        """Textual-inversion vectors for each text encoder of the model and of the refiner (SDXL
        files hold clip_l and clip_g vectors; each encoder takes its own)."""
        self.embeddings.refresh()
        out = []
        for bundle, runners in ((self.bundle, self.text), (self.refiner, self.refiner_text)):
            slots = bundle.family.text_encoders if bundle is not None else ()
            per_encoder = []
            for runner, slot in zip(runners, slots, strict=True):
                width = runner.encoder.cfg.width
                for text in (prompt, negative):
                    self.embeddings.check_prompt(text, runner.tokenizer, width, slot.embedding_key)
                per_encoder.append(self.embeddings.tensors(width, slot.embedding_key))
            out.append(per_encoder)
        return out

    def _set_loras(self, specs: list[LoraSpec]) -> None:
        """Merge the request's LoRAs into the weights (and restore them exactly when a later
        request drops them); the text encoders' caches follow the weights' version."""
        self.loras.set(self.bundle, specs)
        for runner in self.text:
            runner.weights_version = self.loras.te_version
        if self.refiner is not None:
            self.refiner_loras.set(self.refiner, specs, strict=False)
            for runner in self.refiner_text:
                runner.weights_version = self.refiner_loras.te_version

    def _extra_infotext(self, specs, text: str) -> dict[str, str]:
        extras = {}
        if specs:
            extras["Lora hashes"] = ", ".join(f"{s.name}: {self.models.lora_hash(s.path)}" for s in specs)
        used = [e for name, e in self.embeddings.embeddings.items() if name in text]
        if used:
            extras["TI hashes"] = ", ".join(f"{e.name}: {self.models.infotext_hash('embedding', e.path)}"
                                            for e in used)
        return extras


def _control_infotext(controls: list) -> dict[str, str]:
    """The extension's infotext lines: `ControlNet 0: "Module: canny, Model: name, Weight: 1, ..."`."""
    # quoted by create_infotext; numbered over the units of the request, which are its enabled ones
    return {f"ControlNet {i}": infotext_line(c) for i, c in enumerate(controls) if isinstance(c, ControlRequest)}


def _vae_in_fp32_on_cpu(bundle: Bundle) -> None:
    """The VAE runs in fp32 on the CPU, where fp16/bf16 cost accuracy for little speed."""
    vae = bundle.vae
    if bundle.device.type == "cpu" and next(vae.parameters()).dtype != torch.float32:
        vae.float()
