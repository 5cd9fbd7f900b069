"""`sdrun`: generate images from a compiled bundle (no torch needed)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from sdrun import __version__
from sdrun.backends import BACKEND_CHOICES, TORCH_DTYPES
from sdrun.errors import debug_option, run_cli
from sdrun.image_input import DEFAULT_RESIZE_MODE, ResizeMode


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which lets NaN and inf through its bounds, refusing them."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


@click.group(name="sdrun", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdrun")
@debug_option()
def cli(debug) -> None:
    """Run Stable Diffusion from a bundle made by `sdcompile export`.

    \b
    Example:
      sdrun txt2img --bundle bundle/ --prompt "a lighthouse at dawn" --out out.png
    """


def generation_options(command):
    options = [
        click.option("--bundle", type=click.Path(path_type=Path), help="bundle directory (required without --server)"),
        click.option("--prompt", required=True),
        click.option("--negative-prompt", default="", show_default=True),
        click.option("--steps", type=int, help="sampling steps [default: the recipe's]"),
        click.option("--guidance", type=float, help="classifier-free guidance scale [default: the recipe's]"),
        click.option("--seed", type=int, default=0, show_default=True, help="seeds numpy.random.default_rng"),
        click.option("--height", type=int, help="pixels [default: the recipe's]"),
        click.option("--width", type=int, help="pixels [default: the recipe's]"),
        click.option("--batch", type=int, default=1, show_default=True),
        click.option("--eta", type=float, help="DDIM eta, from 0 (deterministic) to 1 [default: 0]"),
        click.option("--sampler", help="sampler name or id, e.g. \"DPM++ 2M Karras\" or dpmpp_2m_karras "
                                        "(`sdrun samplers` lists them) [default: DDIM]"),
        click.option("--karras/--no-karras", default=None, help="Karras sigmas, for samplers that have sigmas"),
        click.option("--timestep-spacing", "spacing", type=click.Choice(["leading", "linspace", "trailing"]),
                     help="timestep spacing [default: the sampler's, as diffusers' from_config gives it]"),
        click.option("--original-size", type=int, nargs=2, metavar="HEIGHT WIDTH",
                     help="SDXL: the size the UNet is told the image had before cropping [default: the output size]"),
        click.option("--crop", type=int, nargs=2, metavar="TOP LEFT",
                     help="SDXL: the crop offset the UNet is told of, pixels [default: 0 0]"),
        click.option("--target-size", type=int, nargs=2, metavar="HEIGHT WIDTH",
                     help="SDXL: the size the UNet is told to aim for [default: the output size]"),
        click.option("--max-chunks", type=int, help="75-token prompt chunks allowed (longer prompts are refused) "
                     "[default: the most the bundle's UNet takes]"),
        click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True),
        click.option("--init-noise", type=click.Path(path_type=Path), help=".npy (batch, 4, h/8, w/8) float32 noise"),
        click.option("--out", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True),
        click.option("--threads", type=int, help="ONNX Runtime intra-op threads [default: one per core]"),
        click.option("--cuda-graph", is_flag=True,
                     help="TensorRT: capture one denoising step as a CUDA graph and replay it (static engines)"),
        click.option("--device", help="torch backend: cpu, cuda or cuda:N [default: cpu]"),
        click.option("--dtype", type=click.Choice(TORCH_DTYPES), help="torch backend: precision [default: fp32]"),
        click.option("--lora", multiple=True, metavar="FILE[:SCALE]",
                     help="swap a LoRA (.safetensors, kohya or diffusers layout) into the weights at load, SCALE "
                          "default 1 (repeatable; onnxruntime backend)"),
        click.option("--lora-dir", type=click.Path(path_type=Path),
                     help="where the prompt's <lora:NAME:SCALE> tags find NAME.safetensors"),
        click.option("--quiet", is_flag=True, help="no progress bar or timing table"),
        click.option("--profile", type=click.Path(file_okay=False, path_type=Path),
                     help="write the backend's operator profile (Chrome trace) and a time/memory summary here"),
        click.option("--server", metavar="URL", help="generate on a running `sdrun serve` (http://HOST:PORT) "
                                                     "instead of a local bundle"),
        click.option("--timeout", type=FiniteFloatRange(min=1), default=600.0, show_default=True,
                     help="with --server: seconds to wait for the image"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command("samplers")
def samplers_command() -> None:
    """List the samplers, by the names the web UIs use and their short ids."""
    from sdrun.samplers import SAMPLERS

    for sampler in SAMPLERS.values():
        click.echo(f"{sampler.label:22s} {sampler.id:22s} {sampler.description}")


resize_mode_option = click.option(
    "--resize-mode", type=click.Choice([mode.value for mode in ResizeMode]), default=DEFAULT_RESIZE_MODE.value,
    show_default=True, help="how the image reaches the output size: stretch it; scale to cover and centre-crop; or "
                            "scale to fit and stretch the edge pixels over the rest")


@cli.command("txt2img")
@generation_options
def txt2img_command(**options) -> None:
    """Generate images from a text prompt."""
    _generate(options, image=None, strength=None)


@cli.command("img2img")
@generation_options
@click.option("--image", type=click.Path(path_type=Path), required=True, help="input image")
@click.option("--strength", type=float, default=0.75, show_default=True, help="fraction of the schedule re-run, (0, 1]")
@resize_mode_option
def img2img_command(image, strength, **options) -> None:
    """Transform an image guided by a text prompt.

    The output has --height x --width (default: the recipe's size), whatever the input's size; any
    image PIL reads is taken upright by its EXIF orientation, transparency composited onto white.
    """
    _generate(options, image=image, strength=strength)


@cli.command("inpaint")
@generation_options
@click.option("--image", type=click.Path(path_type=Path), required=True, help="input image")
@click.option("--mask", type=click.Path(path_type=Path), required=True,
              help="mask image, white = repaint (resized to the image's size if it differs)")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="fraction of the schedule re-run, (0, 1]; 1 starts the masked region from pure noise")
@click.option("--mask-blur", type=FiniteFloatRange(min=0), default=0.0, show_default=True, metavar="PIXELS",
              help="Gaussian blur of the mask (standard deviation, pixels): a soft seam where the output meets "
                   "the input")
@resize_mode_option
def inpaint_command(image, mask, strength, mask_blur, **options) -> None:
    """Repaint the masked region of an image guided by a text prompt (any SD model; inpainting models
    see the mask and the masked image, ordinary ones blend latents)."""
    _generate(options, image=image, strength=strength, mask=mask, mask_blur=mask_blur)


def _generate(options: dict, image: Path | None, strength: float | None, **image_options) -> None:
    from sdrun.generate import GenerateJob, run_job

    job = GenerateJob(**options, image=image, strength=strength, **image_options)
    report = run_job(job, echo=lambda line: click.echo(line, err=True),
                     progress=None if options["quiet"] else _progress_bar())
    for path in report:
        click.echo(str(path))


@cli.command("serve")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="bundle directory")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (0.0.0.0: every interface)")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--max-batch", type=int, help="images per denoising loop [default: the bundle's batch profile max]")
@click.option("--max-queue-delay-ms", type=FiniteFloatRange(min=0), default=5.0, show_default=True,
              help="how long a loop waits for more requests of its size, steps and sampler (0: no batching wait)")
@click.option("--instances", type=int, default=1, show_default=True,
              help="pipelines running loops side by side (each loads its own runners)")
@click.option("--threads", type=int, help="ONNX Runtime intra-op threads per pipeline [default: one per core]")
@click.option("--quality-metrics-port", type=click.IntRange(1, 65535),
              help="Prometheus counts of black, saturated and non-finite images [default: --metrics-port + 1]")
def serve_command(bundle, backend, host, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_ms,
                  instances, threads, quality_metrics_port) -> None:
    """Serve txt2img (and img2img) on Triton Inference Server: HTTP, gRPC, health and metrics.

    \b
    Example:
      sdrun serve --bundle bundle/ --http-port 8000
      sdrun txt2img --server http://127.0.0.1:8000 --prompt "a lighthouse at dawn" --out out.png
    """
    from sdrun.serve.server import ServeOptions, serve

    serve(ServeOptions(bundle, backend, host, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_ms,
                       instances, threads, quality_metrics_port), echo=lambda line: click.echo(line, err=True))


def _progress_bar():
    state = {}

    def update(done: int, total: int) -> None:
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\rdenoising [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
        state["done"] = done

    return update


def main(args=None) -> None:
    run_cli(cli, args)
