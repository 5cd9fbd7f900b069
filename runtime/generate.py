"""One `sdrun txt2img/img2img/inpaint` invocation: validate inputs, pick the backend, run, write PNGs."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Callable

import numpy as np

from sdrun.backends import BackendOptions
from sdrun.backends.base import StageTimer
from sdrun.bundle import Bundle
from sdrun.errors import UserError, stage
from sdrun.image_input import DEFAULT_RESIZE_MODE, ResizeMode, fit_pixels, load_image, read_pixels
from sdrun.images import model_image, output_paths, parameters_text, write_png
from sdrun.lora import parse_lora_option, prompt_lora_tags
from sdrun.masks import blurred, read_mask
from sdrun.pipeline import GenerationRequest, GenerationResult, check_prompts, complete_request
from sdrun.profiling import RunProfile, profile_directory
from sdrun.profiling import describe as describe_profile
from sdrun.quality import quality_warnings
from sdrun.samplers import resolve_sampler
from sdrun.sampling import DEFAULT_SAMPLER
from sdrun.session import open_for_run, pipeline_on


@dataclasses.dataclass(frozen=True)
class GenerateJob:
    bundle: Path
    prompt: str
    out: Path
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    batch: int = 1
    eta: float | None = None  # DDIM only; None: 0
    backend: str = "auto"
    init_noise: Path | None = None
    image: Path | None = None
    strength: float | None = None
    resize_mode: str | None = None  # how the image reaches the output size (`ResizeMode`); None: just-resize
    mask: Path | None = None  # inpainting: white = repaint
    mask_blur: float = 0.0  # inpainting: Gaussian blur of the mask, standard deviation in pixels
    threads: int | None = None  # ONNX Runtime intra-op threads; None: ONNX Runtime's default
    cuda_graph: bool = False  # TensorRT: replay a captured denoising step
    sampler: str | None = None  # None: the recipe's default
    karras: bool | None = None
    spacing: str | None = None
    original_size: tuple[int, int] | None = None  # SDXL size conditioning (height, width); None: output size
    crop: tuple[int, int] | None = None  # (top, left); None: (0, 0)
    target_size: tuple[int, int] | None = None
    device: str | None = None  # torch backend only: "cpu", "cuda", "cuda:N"; None: the CPU
    dtype: str | None = None  # torch backend only: "fp32" | "fp16" | "bf16"; None: fp32
    lora: tuple[str, ...] = ()  # "FILE[:SCALE]" each
    lora_dir: Path | None = None  # where the prompt's <lora:NAME:SCALE> tags are found
    quiet: bool = False
    server: str | None = None  # http://HOST:PORT of a running `sdrun serve`: generate there
    timeout: float = 600.0  # seconds the server may take (with --server)
    max_chunks: int | None = None  # 75-token prompt chunks allowed; None: the bundle's most
    profile: Path | None = None  # write the backend's operator profile and a summary here (`sdrun.profiling`)


# Options a server request does not carry, and their values when not given.
LOCAL_ONLY = {"batch": 1, "eta": None, "backend": "auto", "init_noise": None, "threads": None, "cuda_graph": False,
              "karras": None, "spacing": None, "device": None, "dtype": None, "lora": (), "lora_dir": None,
              "original_size": None, "crop": None, "target_size": None, "mask": None, "mask_blur": 0.0,
              "max_chunks": None, "profile": None}


def run_job(job: GenerateJob, echo: Callable[[str], None], progress=None) -> list[Path]:
    """Every check that needs no model runs before the backend is loaded; returns the PNGs written."""
    _check_output(job.out)
    if job.server:
        return [run_remote(job)]
    if job.bundle is None:
        raise UserError("no bundle to generate with.", fix="add --bundle DIR, or --server URL to use a running server")
    options = backend_options(job)
    img2img = job.image is not None
    prompt, tagged = prompt_lora_tags(job.prompt, job.lora_dir)
    loras = [*(parse_lora_option(text) for text in job.lora), *tagged]
    bundle = open_for_run(job.bundle, img2img=img2img)
    request = complete_request(_request(dataclasses.replace(job, prompt=prompt)), bundle.recipe, img2img=img2img)
    check_prompts(request, bundle)
    if img2img:
        with stage("reading the input image"):
            request = _with_image(job, request, echo)
    profile = RunProfile(job.profile) if job.profile else None
    with stage(f"loading the {job.backend} backend"):
        load = lambda: pipeline_on(bundle, job.backend, options, echo, loras=loras)  # noqa: E731
        loaded = profile.measure("load", load) if profile else load()
    backend = loaded.backend
    _check_cuda_graph(job.cuda_graph, backend)
    if profile:
        profile.watch(loaded.pipeline)
        progress = profile.on_step(progress)
    with stage("generating"):
        result = loaded.pipeline.generate(request, on_step=progress)
    for warning in [*result.warnings, *quality_warnings(result.images)]:
        echo(f"warning: {warning}")
    with stage("writing the PNG"):
        paths = write_images(job.out, result, bundle, backend, img2img, job.prompt, loaded.loras)
    if not job.quiet:
        echo(timing_table(result.timer, None, loaded.load_seconds, loaded.lora_seconds))
    if profile:
        echo(describe_profile(profile.write(loaded.runners, result.timer, loaded.load_seconds)))
    return paths


def run_remote(job: GenerateJob) -> Path:
    """The job sent to the server at `job.server`; the PNG it answers is written as a local run writes it."""
    from sdrun.serve.client import remote_generate, request_tensors
    from sdrun.serve.contract import IMG2IMG, TXT2IMG

    given = [f"--{name.replace('_', '-')}" for name, default in LOCAL_ONLY.items() if getattr(job, name) != default]
    if given:
        raise UserError(f"{', '.join(given)} cannot be sent to a server.", fix=f"drop {', '.join(given)}, or run "
                        "locally with --bundle")
    values = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "steps": job.steps,
              "guidance": job.guidance, "seed": job.seed, "height": job.height, "width": job.width,
              "sampler": job.sampler}
    if job.image is not None:
        values |= {"image": remote_image(job), "strength": job.strength}
    model = TXT2IMG if job.image is None else IMG2IMG
    image, parameters = remote_generate(job.server, model, request_tensors(model, values), job.timeout)
    write_png(job.out, image, parameters)
    return job.out


def remote_image(job: GenerateJob) -> np.ndarray:
    """(H, W, 3) uint8: at --width x --height when both are given; else at its own size, which the server
    stretches to the size it fills in (the default resize mode)."""
    if job.width and job.height:
        return load_image(job.image, job.width, job.height, job.resize_mode)
    if ResizeMode(job.resize_mode or DEFAULT_RESIZE_MODE) is not DEFAULT_RESIZE_MODE:
        raise UserError(f"--resize-mode {job.resize_mode} with --server needs the output size.",
                        fix="add --width and --height, or drop --resize-mode")
    return read_pixels(job.image)


def backend_options(job: GenerateJob) -> BackendOptions:
    """The job's backend options; --device and --dtype place the eager torch models, so they need that backend."""
    given = [f"--{name} {value}" for name, value in (("device", job.device), ("dtype", job.dtype)) if value]
    if given and job.backend != "torch":
        raise UserError(f"{' and '.join(given)} choose where and in what precision the torch backend runs, and the "
                        f"backend is {job.backend}.", expected="--backend torch", got=f"--backend {job.backend}",
                        fix=f"add --backend torch, or drop {' and '.join(g.split()[0] for g in given)}")
    _check_cuda_graph(job.cuda_graph, job.backend)
    return BackendOptions(threads=job.threads, device=job.device, dtype=job.dtype, cuda_graph=job.cuda_graph,
                          profile_dir=profile_directory(job.profile) if job.profile else None)


def write_images(out: Path, result: GenerationResult, bundle: Bundle, backend: str, img2img: bool,
                 prompt: str | None = None, loras: Sequence[dict] = ()) -> list[Path]:
    """One PNG per image, each with the web UIs' `parameters` text (`result_parameters`)."""
    text = result_parameters(result, bundle, backend, img2img, prompt, loras)
    paths = output_paths(out, len(result.images))
    for path, image in zip(paths, result.images):
        write_png(path, image, text)
    return paths


def result_parameters(result: GenerationResult, bundle: Bundle, backend: str, img2img: bool,
                      prompt: str | None = None, loras: Sequence[dict] = ()) -> str:
    """The web UIs' PNG `parameters` text of a result; `prompt`: as typed (LoRA tags kept), None: the request's."""
    final = result.request
    extra = {"Backend": backend, **({"Denoising strength": final.strength} if img2img else {}),
             **size_fields(final), **lora_fields(loras)}
    return parameters_text(final.prompt if prompt is None else prompt, final.negative_prompt, final.steps,
                           final.guidance, final.seed, final.width, final.height, bundle.manifest.weights_sha256,
                           bundle.recipe.name, extra, sampler=sampler_label(final.sampler, final.karras))


def size_fields(request: GenerationRequest) -> dict[str, str]:
    """SDXL's size conditioning as `Original size: 1024x1024, Crop: 0x0, Target size: 1024x1024` (height × width)."""
    named = {"Original size": request.original_size, "Crop": request.crop, "Target size": request.target_size}
    return {name: f"{value[0]}x{value[1]}" for name, value in named.items() if value is not None}


def lora_fields(loras: Sequence[dict]) -> dict[str, str]:
    """The web UIs' `Lora hashes: "name: sha256[:12]"` field, and our `Lora: "name:scale"` for the scales."""
    if not loras:
        return {}
    names = [Path(lora["file"]).stem for lora in loras]
    return {"Lora": '"' + ", ".join(f"{n}:{lora['scale']:g}" for n, lora in zip(names, loras)) + '"',
            "Lora hashes": '"' + ", ".join(f"{n}: {lora['sha256'][:12]}" for n, lora in zip(names, loras)) + '"'}


def timing_table(timer: StageTimer, steps: int | None, load_seconds: float, lora_seconds: float = 0.0) -> str:
    """Per-stage wall time, like the TensorRT demo's summary, plus time spent outside graph calls."""
    seconds = timer.seconds
    rows = [("text_encoder", seconds.get("text_encoder", 0.0))]
    if "vae_encoder" in seconds:
        rows.append(("vae_encoder", seconds["vae_encoder"]))
    steps = steps or timer.counts.get("graph:unet_step", 0) or timer.counts.get("graph:unet", 0)
    rows += [(f"denoise x {steps}", seconds.get("denoise", 0.0)), ("vae_decoder", seconds.get("vae_decoder", 0.0))]
    total = seconds.get("total", 0.0)
    in_graphs = sum(v for k, v in seconds.items() if k.startswith("graph:"))
    line = "|------------------|--------------|"
    out = [line, "|      Stage       |   Latency    |", line]
    out += [f"| {name:^16} | {value * 1e3:9.2f} ms |" for name, value in rows]
    out += [line, f"| {'Pipeline':^16} | {total * 1e3:9.2f} ms |",
            f"| {'outside graphs':^16} | {(total - in_graphs) * 1e3:9.2f} ms |",
            f"| {'session load':^16} | {load_seconds * 1e3:9.2f} ms |"]
    if lora_seconds:
        out.append(f"| {'of which LoRA':^16} | {lora_seconds * 1e3:9.2f} ms |")
    return "\n".join([*out, line])


def _request(job: GenerateJob) -> GenerationRequest:
    """The job as a request with its noise file read; the image is read once the request is validated and its
    size filled in (--height/--width, else the recipe's default: the image's own size may be outside the profile)."""
    return GenerationRequest(
        prompt=job.prompt, negative_prompt=job.negative_prompt, steps=job.steps, guidance=job.guidance,
        seed=job.seed, height=job.height, width=job.width, batch=job.batch, eta=job.eta,
        init_noise=_load_noise(job.init_noise) if job.init_noise else None,
        strength=job.strength if job.strength is not None else 0.75, sampler=job.sampler, karras=job.karras,
        spacing=job.spacing, original_size=_pair(job.original_size), crop=_pair(job.crop),
        target_size=_pair(job.target_size), max_chunks=job.max_chunks)


def _with_image(job: GenerateJob, request: GenerationRequest, echo: Callable[[str], None]) -> GenerationRequest:
    """The validated request with the job's image, and its mask (blurred by --mask-blur), at the request's size."""
    pixels = read_pixels(job.image)
    image = model_image(fit_pixels(pixels, request.width, request.height, job.resize_mode))
    if job.mask is None:
        return dataclasses.replace(request, image=image)
    mask, note = read_mask(job.mask, pixels.shape[:2], (request.height, request.width), job.resize_mode)
    if note:
        echo(f"note: {note}")
    return dataclasses.replace(request, image=image, mask=blurred(mask, job.mask_blur))


def _pair(values) -> tuple[int, int] | None:
    return None if values is None else tuple(values)


def _load_noise(path: Path) -> np.ndarray:
    try:
        noise = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--init-noise file {path} does not exist.", fix="pass a .npy file") from None
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read {path} as a numpy array ({err}).",
                        fix="save the noise with numpy.save (no pickled objects)") from None
    if not np.issubdtype(noise.dtype, np.floating):
        raise UserError(f"--init-noise {path} must hold floats.", got=str(noise.dtype), fix="save float32 noise")
    return noise.astype(np.float32)


def sampler_label(sampler: str | None, karras: bool | None) -> str:
    """The sampler as the web UIs name it in PNG parameters ("DPM++ 2M Karras")."""
    chosen = resolve_sampler(sampler or DEFAULT_SAMPLER)
    return chosen.label + (" Karras" if karras and not chosen.karras else "")


def _check_cuda_graph(cuda_graph: bool, backend: str) -> None:
    if cuda_graph and backend not in ("auto", "tensorrt"):
        raise UserError(f"--cuda-graph replays TensorRT engines, and this run uses {backend}.",
                        fix="add --backend tensorrt (engines built with sdcompile build-trt --static), or drop "
                            "--cuda-graph")


def _check_output(out: Path) -> None:
    parent = Path(out).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out}: {parent} is not a writable directory.",
                        fix="create the directory or choose another --out")

