"""`sdrun txt2img` / `img2img` on the tiny fp32 bundle: outputs, reproducibility and bad input."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdrun.cli import cli
from sdrun.errors import USAGE_EXIT_CODE, UserError
from sdrun.pipeline import GenerationRequest
from sdrun.session import load_pipeline
from tests.sdrun_exit import sdrun


def _run(*args):
    result = CliRunner().invoke(cli, list(map(str, args)), standalone_mode=False, catch_exceptions=True)
    if isinstance(result.exception, UserError):
        return 2, str(result.exception)
    assert result.exception is None, result.exception
    return 0, result.output


def _txt2img(bundle, out, *extra):
    return _run("txt2img", "--bundle", bundle, "--prompt", "a red cube", "--steps", 4, "--quiet",
                "--backend", "onnxruntime", "--out", out, *extra)


def test_txt2img_writes_png_with_parameters(tiny_bundle, tmp_path):
    code, _ = _txt2img(tiny_bundle, tmp_path / "a.png", "--seed", 7, "--negative-prompt", "blurry")
    assert code == 0
    image = Image.open(tmp_path / "a.png")
    assert image.size == (64, 64) and image.mode == "RGB"
    text = image.text["parameters"]
    assert text.startswith("a red cube\nNegative prompt: blurry\n")
    for field in ("Steps: 4", "Sampler: DDIM", "CFG scale: 7.5", "Seed: 7", "Size: 64x64", "Model hash: ", "Model: tiny"):
        assert field in text


def test_same_seed_same_image_and_batches_get_numbered_files(tiny_bundle, tmp_path):
    _txt2img(tiny_bundle, tmp_path / "a.png", "--seed", 3)
    _txt2img(tiny_bundle, tmp_path / "b.png", "--seed", 3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    code, output = _txt2img(tiny_bundle, tmp_path / "batch.png", "--batch", 2)
    assert code == 0 and (tmp_path / "batch-1.png").exists() and (tmp_path / "batch-2.png").exists()


def test_init_noise_reproduces_the_seeded_run(tiny_bundle, tmp_path):
    noise = np.random.default_rng(11).standard_normal((1, 4, 8, 8), dtype=np.float32)
    np.save(tmp_path / "noise.npy", noise)
    _txt2img(tiny_bundle, tmp_path / "seeded.png", "--seed", 11)
    _txt2img(tiny_bundle, tmp_path / "file.png", "--seed", 99, "--init-noise", tmp_path / "noise.npy")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "seeded.png")), np.asarray(Image.open(tmp_path / "file.png")))


def test_timing_table_on_stderr(tiny_bundle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x", "--steps", "3",
                                 "--backend", "onnxruntime", "--out", str(tmp_path / "t.png")])
    assert result.exit_code == 0, result.output
    for stage in ("text_encoder", "denoise x 3", "vae_decoder", "Pipeline", "outside graphs"):
        assert stage in result.stderr


def test_txt2img_on_onnxruntime_never_imports_torch(tiny_bundle, tmp_path):
    script = ("import sys\nfrom sdrun.cli import main\n"
              f"main(['txt2img', '--bundle', {str(tiny_bundle)!r}, '--prompt', 'x', '--steps', '2', '--quiet',"
              f" '--backend', 'onnxruntime', '--out', {str(tmp_path / 'n.png')!r}])\n"
              "heavy = sorted(m for m in ('torch', 'sdcompile', 'onnx', 'torchvision') if m in sys.modules)\n"
              "print('IMPORTED', heavy)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout
    assert (tmp_path / "n.png").exists()


def test_img2img_runs_int_strength_times_steps(tiny_bundle, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "in.png")
    pipeline = load_pipeline(tiny_bundle, "onnxruntime", img2img=True).pipeline
    image = np.zeros((1, 3, 64, 64), np.float32)
    for steps, strength in ((10, 0.75), (10, 0.5), (7, 1.0)):
        result = pipeline.generate(GenerationRequest("x", steps=steps, image=image, strength=strength))
        assert result.timer.counts["graph:unet_step"] == int(strength * steps)
    code, _ = _run("img2img", "--bundle", tiny_bundle, "--image", tmp_path / "in.png", "--prompt", "x",
                   "--steps", 4, "--strength", 0.5, "--quiet", "--backend", "onnxruntime", "--out", tmp_path / "i.png")
    assert code == 0 and Image.open(tmp_path / "i.png").size == (64, 64)


@pytest.mark.parametrize("extra, message", [
    (("--height", 72), "not a multiple of 16"),
    (("--width", 256), "outside the bundle's profile"),
    (("--steps", 0), "steps must be a positive integer"),
    (("--batch", 9), "batch is outside"),
    (("--backend", "tensorrt"), "TensorRT"),
])
def test_bad_generation_options(tiny_bundle, tmp_path, extra, message):
    args = ["txt2img", "--bundle", tiny_bundle, "--prompt", "x", "--quiet", "--out", tmp_path / "bad.png"]
    code, text = _run(*args, *extra)
    assert code == 2 and message in text
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_bad_strength(tiny_bundle, tmp_path, strength):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in.png")
    code, text = _run("img2img", "--bundle", tiny_bundle, "--image", tmp_path / "in.png", "--prompt", "x",
                      "--strength", strength, "--out", tmp_path / "bad.png")
    assert code == 2 and "strength" in text and not (tmp_path / "bad.png").exists()


NON_FINITE = [("txt2img", "--guidance", "nan", "guidance must be a finite number"),
              ("txt2img", "--guidance", "inf", "guidance must be a finite number"),
              ("txt2img", "--eta", "nan", "eta must be a finite number"),
              ("img2img", "--strength", "nan", "strength must be a finite number"),
              ("img2img", "--strength", "-inf", "strength must be a finite number"),
              ("img2img", "--guidance", "-inf", "guidance must be a finite number"),
              ("txt2img", "--timeout", "inf", "'inf' is not a finite number"),
              ("txt2img", "--seed", "nan", "'nan' is not a valid integer"),
              ("img2img", "--height", "inf", "'inf' is not a valid integer")]


@pytest.mark.parametrize("command, option, value, message", NON_FINITE)
def test_non_finite_numbers_are_refused_up_front(command, option, value, message, tiny_bundle, tmp_path, capsys):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in.png")
    image = ["--image", tmp_path / "in.png"] if command == "img2img" else []
    code, err = sdrun(capsys, command, "--bundle", tiny_bundle, "--prompt", "x", "--quiet", *image,
                      option, value, "--out", tmp_path / "bad.png")
    assert code == USAGE_EXIT_CODE and message in err and "fp16" not in err, err
    assert not (tmp_path / "bad.png").exists()


def test_serve_refuses_a_non_finite_queue_delay(tiny_bundle, capsys):
    code, err = sdrun(capsys, "serve", "--bundle", tiny_bundle, "--max-queue-delay-ms", "nan")
    assert code == USAGE_EXIT_CODE and "'nan' is not a finite number" in err


def test_strength_is_named_before_an_odd_sized_image_is_read(tiny_bundle, tmp_path, capsys):
    Image.fromarray(np.zeros((300, 200, 3), np.uint8)).save(tmp_path / "in.png")
    code, err = sdrun(capsys, "img2img", "--bundle", tiny_bundle, "--image", tmp_path / "in.png", "--prompt", "x",
                      "--strength", 1.5, "--out", tmp_path / "bad.png")
    assert code == USAGE_EXIT_CODE and "strength" in err and "height" not in err, err
    assert not (tmp_path / "bad.png").exists()


def test_unreadable_image(tiny_bundle, tmp_path):
    (tmp_path / "in.png").write_bytes(b"not an image")
    code, text = _run("img2img", "--bundle", tiny_bundle, "--image", tmp_path / "in.png", "--prompt", "x",
                      "--out", tmp_path / "bad.png")
    assert code == 2 and "cannot read" in text and not (tmp_path / "bad.png").exists()


def test_missing_and_tampered_bundles(tiny_bundle, tmp_path):
    code, text = _txt2img(tmp_path / "nope", tmp_path / "bad.png")
    assert code == 2 and "does not exist" in text
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    graph = tampered / "unet_step" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    code, text = _txt2img(tampered, tmp_path / "bad.png")
    assert code == 2 and "does not match the manifest" in text and "sdcompile export" in text
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["format_version"] = 1  # before the step-fused UNet took a sampler state
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    code, text = _txt2img(tampered, tmp_path / "bad.png")
    assert code == 2 and "unsupported format" in text and "sdcompile export --recipe tiny" in text
    assert not (tmp_path / "bad.png").exists()


class _NaNStep:
    rebuild_hint = "sdcompile export ..."

    def run(self, feeds):
        return {"next_state": np.full_like(feeds["state"], np.nan)}


def test_non_finite_latents_name_the_stage(tiny_bundle):
    from sdrun.backends import make_runners
    from sdrun.bundle import open_bundle
    from sdrun.pipeline import Pipeline

    bundle = open_bundle(tiny_bundle, lambda manifest: ["text_encoder"])
    runners = {**make_runners("onnxruntime", bundle, ["text_encoder"]), "unet_step": _NaNStep()}
    request = GenerationRequest("x", steps=2, sampler="euler")
    with pytest.raises(UserError, match=r"evaluation 1/2 of euler.*\n.*fp32"):
        Pipeline(bundle, runners).generate(request)


def test_img2img_with_server_sends_the_image_at_the_size_asked_for(tmp_path):
    from sdrun.generate import GenerateJob, remote_image

    Image.fromarray(np.zeros((300, 200, 3), np.uint8)).save(tmp_path / "in.png")
    job = GenerateJob(bundle=None, prompt="x", out=tmp_path / "o.png", image=tmp_path / "in.png",
                      server="http://127.0.0.1:1")
    assert remote_image(dataclasses.replace(job, width=96, height=64, resize_mode="crop")).shape == (64, 96, 3)
    assert remote_image(job).shape == (300, 200, 3)  # the server stretches it to the size it fills in
    with pytest.raises(UserError, match="--resize-mode fill with --server needs the output size"):
        remote_image(dataclasses.replace(job, width=96, resize_mode="fill"))
