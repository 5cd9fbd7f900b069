"""The one prepared check for a machine with an NVIDIA GPU: `python benchmarks/gpu_check.py`.

Three parts, each passing or failing on its own, then one table and a JSON report (`--out`):
- cuda buffers (`benchmarks.gpu_cuda_buffers`, needs CUDA Python, not TensorRT): the runtime's device
  buffers, page-locked host buffers, stream and shared scratch, with random bytes round-tripped bit
  for bit;
- torch cuda (`benchmarks.gpu_torch_anchor`, needs torch with CUDA): the SD 1.5 UNet in eager fp16 at
  512² batch 2, timed, and held to the fp16 gate against fp32: the GPU anchor;
- tensorrt (below, where TensorRT is installed): exports the tiny recipe with seeded random weights
  (unless the bundle exists), builds its engines, runs every component on TensorRT and on ONNX
  Runtime CPU with the same inputs (accuracy and latency side by side), checks that device buffers
  are reused across calls, and runs one txt2img per backend with the images compared. Every runner
  is made through the backend registry.

    python benchmarks/gpu_check.py [--out FILE] [--unet-repeats N] [--bundle DIR] [--precision fp16|fp32]
                                   [--static] [--repeats N]

Exit status: 2 without an NVIDIA GPU (nothing checked; the reason is printed), 1 when any part
failed (including TensorRT that is installed but cannot build or run), 0 when every part that ran
passed; TensorRT that is not installed is "not run", with the reason.
"""
from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository's `benchmarks` package must import
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click
import numpy as np

from benchmarks.gpu_parts import NO_GPU_EXIT, Check, PartResult, Status, error_text, exit_code, run_part
from sdrun.backends import BackendOptions

PRECISIONS = ("fp16", "fp32")
CPU_REFERENCE = BackendOptions(providers=("CPUExecutionProvider",))
DEFAULT_BUNDLE = Path("build/gpu-check")
DEFAULT_REPORT = DEFAULT_BUNDLE / "gpu-check.json"
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
    """txt2img on ONNX Runtime and on TensorRT with one seed; image statistics, or None when a run failed.

    The images are held to the fp16 end-to-end gate (PSNR) at either precision: TensorRT's fp32 kernels
    sum in another order over every step.
    """
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


def end_to_end_check(stats: dict | None) -> Check:
    from sdrun.gates import pipeline_image_gate

    if stats is None:
        return Check("txt2img tensorrt vs onnxruntime", False, "a txt2img run failed (its stderr is above)")
    verdict = pipeline_image_gate("fp16").judge("txt2img tensorrt vs onnxruntime", stats)
    return Check("txt2img tensorrt vs onnxruntime", verdict.passed, verdict.describe())


def buffer_reuse_check(bundle: Path, steps: int = 3) -> Check:
    """The UNet's device buffers: the same pointers on every call of one shape, also after another shape ran."""
    from sdrun.backends import make_runners
    from sdrun.bundle import open_bundle

    opened = open_bundle(bundle, lambda manifest: ["unet"])
    runner = make_runners("tensorrt", opened, ["unet"])["unet"]
    record, vocab = opened.component("unet"), opened.recipe.text_encoder.vocab_size
    feeds = {level: sample_feeds(record, {n: lv[level] for n, lv in record.profile.items()}, vocab,
                                 np.random.default_rng(0)) for level in ("opt", "min")}
    seen = []
    for level in ["opt"] * steps + ["min", "opt"]:
        runner.run(feeds[level])
        seen.append(runner.device_pointers())
    opt_calls = [pointers for pointers, level in zip(seen, ["opt"] * steps + ["min", "opt"]) if level == "opt"]
    reused = all(p == opt_calls[0] for p in opt_calls) and bool(opt_calls[0])
    return Check("unet device buffers reused", reused, f"{len(opt_calls)} calls at the opt shape (one call at the min "
                 f"shape between) bound {'the same' if reused else 'different'} {len(opt_calls[0])} tensor addresses")


@dataclasses.dataclass(frozen=True)
class TensorRTCheck:
    bundle: Path | None
    precision: str
    static: bool
    repeats: int


def tensorrt_part(check: TensorRTCheck) -> PartResult:
    """Not run where TensorRT is not installed; failed where it is but cannot run; else every check below."""
    from sdrun.backends.tensorrt import probe_tensorrt

    probe = probe_tensorrt()
    if probe.problem is not None:
        return PartResult("tensorrt", Status.FAILED if probe.installed else Status.NOT_RUN, error_text(probe.problem))
    bundle = check.bundle or DEFAULT_BUNDLE / f"tiny-{check.precision}"
    ensure_bundle(bundle, check.precision)
    build_bundle_engines(bundle, check.static)
    results = compare_components(bundle, check.repeats)
    click.echo("\nAccuracy (reference: ONNX Runtime CPU)\n" + accuracy_table(results))
    click.echo("\nLatency (median per call)\n" + latency_table(results) + "\n")
    checks = [Check(f"{r.name}: {output}", v.passed, v.describe()) for r in results for output, v in r.verdicts.items()]
    checks += [buffer_reuse_check(bundle), end_to_end_check(run_end_to_end(bundle, bundle.parent))]
    latency = {r.name: {"tensorrt_ms": r.candidate_ms, "onnxruntime_cpu_ms": r.onnxruntime_ms} for r in results}
    return PartResult.from_checks("tensorrt", checks, {"tensorrt": probe.trt.__version__, "latency": latency})


def environment() -> dict:
    from sdrun.backends.cuda_stack import installed_cuda_packages, read_driver

    return {"driver": read_driver().description, "python": sys.version.split()[0],
            "packages": {p.name: p.version for p in installed_cuda_packages()}}


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_REPORT, show_default=True,
              help="the JSON report")
@click.option("--unet-repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="timed SD 1.5 UNet calls in the torch cuda part")
@click.option("--bundle", type=click.Path(path_type=Path),
              help="TensorRT part: bundle to use or create (default: build/gpu-check/tiny-PRECISION)")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True)
@click.option("--static", is_flag=True, help="TensorRT part: static engines at the recipe's opt shapes")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="TensorRT part: timed calls per component")
def main(out, unet_repeats, bundle, precision, static, repeats) -> None:
    """CUDA buffers, the torch CUDA UNet anchor and (where installed) TensorRT against ONNX Runtime CPU."""
    from benchmarks.gpu_cuda_buffers import cuda_buffer_part
    from benchmarks.gpu_parts import summary_table, write_report
    from benchmarks.gpu_torch_anchor import AnchorConfig, torch_anchor_part
    from sdrun.backends.cuda_stack import read_driver

    driver = read_driver()
    if driver.device_count == 0:
        click.echo(f"cannot check the GPU paths: {driver.problem}. Run this on a machine with an NVIDIA GPU; "
                   "its CPU side runs in tests/benchmarks/test_gpu_check_runners.py.", err=True)
        sys.exit(NO_GPU_EXIT)
    click.echo(f"{driver.description}")
    parts = [run_part("cuda buffers", cuda_buffer_part, click.echo),
             run_part("torch cuda", lambda: torch_anchor_part(AnchorConfig(repeats=unet_repeats)), click.echo),
             run_part("tensorrt", lambda: tensorrt_part(TensorRTCheck(bundle, precision, static, repeats)), click.echo)]
    code = exit_code(True, parts)
    click.echo("\n" + summary_table(parts))
    click.echo(f"\nwrote {write_report(out, environment(), parts, code)}; exit status {code}")
    sys.exit(code)


if __name__ == "__main__":
    main()
