"""Check the TensorRT path once on a machine with TensorRT and an NVIDIA GPU.

Exports the tiny recipe with seeded random weights (unless the bundle exists), builds its
TensorRT engines, runs every component on TensorRT and on ONNX Runtime CPU with the same
inputs, and prints accuracy and latency side by side; then one txt2img run per backend with
the images compared. Every runner is made through the backend registry.

    python benchmarks/gpu_check.py [--bundle DIR] [--precision fp16|fp32] [--static] [--repeats N]

Exit status: 0 when every component is within tolerance and both txt2img runs succeed, 1 when
one is not or does not, 2 when TensorRT or a GPU is missing (the reason is printed).
"""
from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from sdrun.backends import BackendOptions

PRECISIONS = ("fp16", "fp32")
CPU_REFERENCE = BackendOptions(providers=("CPUExecutionProvider",))
DEFAULT_BUNDLE = Path("build/gpu-check")
TIMESTEP = 500.0  # mid-schedule, a typical UNet input
PROMPT = "a lighthouse on a cliff at dawn"


@dataclasses.dataclass(frozen=True)
class ComponentResult:
    name: str
    shapes: dict  # input name -> shape
    verdicts: dict  # output name -> sdrun.gates.Verdict of the candidate against ONNX Runtime CPU
    candidate_ms: float  # median wall time of one call, host copies and synchronization included
    onnxruntime_ms: float

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts.values())


def ensure_bundle(bundle: Path, precision: str, log=print) -> Path:
    """The tiny bundle at `bundle`, exported with seeded random weights when it is not there yet."""
    from sdrun.bundle import MANIFEST_NAME

    if (bundle / MANIFEST_NAME).is_file():
        log(f"using the existing bundle {bundle}")
        return bundle
    from sdcompile.bundler import ExportConfig, export_bundle
    from sdcompile.options import Precision
    from sdcompile.recipes import load_recipe
    from sdcompile.weights import RandomWeights

    export_bundle(ExportConfig(recipe=load_recipe("tiny"), source=RandomWeights(0), out=bundle,
                               precision=Precision(precision)), log=log)
    return bundle


def build_bundle_engines(bundle: Path, static: bool, log=print):
    from sdcompile.trt import BuildOptions, BuildRequest, build_engines
    from sdcompile.trt_profiles import ShapeMode, ShapeRequest

    mode = ShapeMode.STATIC if static else ShapeMode.DYNAMIC
    return build_engines(BuildRequest(bundle, ("all",), BuildOptions(shapes=ShapeRequest(mode))), log=log)


def sample_feeds(record, shapes: dict, vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the given shapes: token ids below the vocabulary size, a mid-schedule timestep, N(0, 1) else."""
    feeds = {}
    for spec in record.inputs:
        shape = tuple(shapes[spec.name])
        if np.dtype(spec.dtype).kind == "i":
            feeds[spec.name] = rng.integers(0, vocab_size, size=shape).astype(spec.dtype)
        elif spec.name == "timestep":
            feeds[spec.name] = np.full(shape, TIMESTEP, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def median_ms(runner, feeds: dict, repeats: int) -> float:
    """Median milliseconds per call after one warm-up (each call returns only once results are on the host)."""
    runner.run(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def compare_components(bundle: Path, repeats: int, candidate: str = "tensorrt",
                       options: BackendOptions = BackendOptions(), seed: int = 0) -> list[ComponentResult]:
    """Every component at the recipe's opt shapes: `candidate` vs ONNX Runtime CPU, same inputs."""
    from sdcompile.trt import BuildOptions  # what build_bundle_engines builds with
    from sdrun.backends import make_runners
    from sdrun.bundle import open_bundle
    from sdrun.gates import tensorrt_gate
    from sdrun.metrics import compare

    opened = open_bundle(bundle)
    names = sorted(opened.verified)
    candidates = make_runners(candidate, opened, names, options)
    references = make_runners("onnxruntime", opened, names, CPU_REFERENCE)
    rng = np.random.default_rng(seed)
    results = []
    for name in names:
        record = opened.component(name)
        shapes = {n: levels["opt"] for n, levels in record.profile.items()}
        feeds = sample_feeds(record, shapes, opened.recipe.text_encoder.vocab_size, rng)
        reference = {k: v.copy() for k, v in references[name].run(feeds).items()}
        result = {k: v.copy() for k, v in candidates[name].run(feeds).items()}
        verdicts = {out: tensorrt_gate(out, record.precision, BuildOptions().tf32).judge(
                        f"{name}: {out}", compare(reference[out], result[out]).to_dict())
                    for out in reference}
        results.append(ComponentResult(name, shapes, verdicts, median_ms(candidates[name], feeds, repeats),
                                       median_ms(references[name], feeds, max(1, repeats // 4))))
    return results


def accuracy_table(results: list[ComponentResult]) -> str:
    lines = ["| component | output | max abs | rel L2 | cosine | PSNR dB | gate |", "|---|---|---|---|---|---|---|"]
    for result in results:
        for output, v in result.verdicts.items():
            c = v.statistics
            gate = "pass" if v.passed else f"FAIL (needs {v.relation} {v.value:.2g})"
            lines.append(f"| {result.name} | {output} | {c['max_abs']:.3g} | {c['rel_l2']:.3g} | {c['cosine']:.6f} | "
                         f"{c['psnr_db']:.1f} | {gate}, limit {v.gate.threshold:g} |")
    return "\n".join(lines)


def latency_table(results: list[ComponentResult]) -> str:
    lines = ["| component | input shapes | ONNX Runtime CPU ms | TensorRT ms | speed-up |", "|---|---|---|---|---|"]
    for r in results:
        shapes = ", ".join(f"{n} {list(s)}" for n, s in r.shapes.items())
        lines.append(f"| {r.name} | {shapes} | {r.onnxruntime_ms:.2f} | {r.candidate_ms:.3f} | "
                     f"{r.onnxruntime_ms / r.candidate_ms:.1f}x |")
    lines.append("\nTensorRT times include the host-to-device copy of the inputs, the device-to-host copy of "
                 "the outputs and one stream synchronization per call.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# End to end: one txt2img per backend through the runtime's own command line


def run_end_to_end(bundle: Path, out: Path, seed: int = 42) -> dict | None:
    """txt2img on ONNX Runtime and on TensorRT with one seed; image statistics, or None when a run failed."""
    images = {}
    for backend in ("onnxruntime", "tensorrt"):
        image = out / f"txt2img-{backend}.png"
        started = time.perf_counter()
        result = subprocess.run(_sdrun_command("txt2img", "--bundle", str(bundle), "--prompt", PROMPT, "--seed",
                                               str(seed), "--backend", backend, "--out", str(image)),
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"end-to-end txt2img FAILED: `sdrun txt2img --backend {backend}` exited {result.returncode}:\n"
                  f"{result.stderr[-2000:]}")
            return None
        images[backend] = (_read_image(image), time.perf_counter() - started)
        print(f"txt2img on {backend}: {images[backend][1]:.2f} s wall (process start and loading included)")
    return _image_report(images["onnxruntime"][0], images["tensorrt"][0])


def _sdrun_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from sdrun.cli import main; main()", *args]


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0


def _image_report(reference: np.ndarray, candidate: np.ndarray) -> dict:
    from sdrun.metrics import compare, ssim

    stats = compare(reference, candidate, data_range=1.0).to_dict()
    stats["ssim"] = ssim(reference, candidate, data_range=1.0)
    print("txt2img TensorRT vs ONNX Runtime: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    return stats


@click.command()
@click.option("--bundle", type=click.Path(path_type=Path),
              help="bundle to use or create (default: build/gpu-check/tiny-PRECISION)")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True)
@click.option("--static", is_flag=True, help="build static engines at the recipe's opt shapes")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="timed calls per component")
def main(bundle, precision, static, repeats) -> None:
    """TensorRT vs ONNX Runtime CPU on the tiny recipe: accuracy and latency per component."""
    from sdrun.backends.tensorrt import tensorrt_available

    available, reason = tensorrt_available()
    if not available:
        click.echo(f"cannot check the TensorRT path: {reason}", err=True)
        sys.exit(2)
    bundle = bundle or DEFAULT_BUNDLE / f"tiny-{precision}"
    ensure_bundle(bundle, precision)
    build_bundle_engines(bundle, static)
    results = compare_components(bundle, repeats)
    click.echo("\nAccuracy (reference: ONNX Runtime CPU)\n" + accuracy_table(results))
    click.echo("\nLatency (median per call)\n" + latency_table(results) + "\n")
    end_to_end = run_end_to_end(bundle, bundle.parent)
    sys.exit(0 if all(r.passed for r in results) and end_to_end is not None else 1)


if __name__ == "__main__":
    main()
