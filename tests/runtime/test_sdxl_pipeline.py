"""SDXL's runtime path on the tiny-xl twin: two encoders padded their own way and concatenated, the pooled
text and six size values as the UNet's added conditioning, and the size options users set."""
from __future__ import annotations

import numpy as np
import pytest

from sdrun.metrics import compare
from sdrun.pipeline import GenerationRequest
from sdrun.sdxl_conditioning import SizeConditioning

PROMPT, NEGATIVE = "a lighthouse on a cliff at dawn", "blurry"
SIZE = 64


@pytest.fixture(scope="module")
def xl(released_twin):
    return released_twin("tiny-xl")


@pytest.fixture(scope="module")
def pipeline(xl):
    from sdrun.session import load_pipeline

    return load_pipeline(xl.bundle, "onnxruntime", step_fusion=False).pipeline


def request(**options) -> GenerationRequest:
    return GenerationRequest(PROMPT, NEGATIVE, steps=3, seed=5, height=SIZE, width=SIZE, **options)


def test_conditioning_is_both_encoders_the_pooled_text_and_the_sizes(pipeline):
    recipe = pipeline.recipe
    first, second = recipe.text_encoders
    completed = pipeline.complete(request(original_size=(128, 96), crop=(8, 0)))
    conditioning, _ = pipeline.conditioning([completed])
    assert {k: v.shape for k, v in conditioning.items()} == {
        "encoder_hidden_states": (2, 77, first.width + second.width), "text_embeds": (2, second.width),
        "time_ids": (2, 6)}
    assert conditioning["time_ids"].tolist() == [[128, 96, 8, 0, SIZE, SIZE]] * 2
    tokens = pipeline.text_tokens([NEGATIVE, PROMPT])
    one, two = (tokens[name].ids for name in ("text_encoder", "text_encoder_2"))
    assert one[0, -1] == 49407 and two[0, -1] == 0, "CLIP-L pads with the end token, bigG with 0"
    assert np.array_equal(one[:, :3], two[:, :3])  # "blurry" is one token: start, it, end
    hidden = pipeline.runners["text_encoder"].run({"input_ids": one})["text_embeddings"]
    assert np.array_equal(conditioning["encoder_hidden_states"][..., :first.width], hidden)


def test_long_prompts_chunk_both_encoders_and_pool_the_first_chunk(pipeline):
    recipe = pipeline.recipe
    first, second = recipe.text_encoders
    long_prompt = f"{PROMPT}, (storm clouds:1.3) BREAK {PROMPT}"
    conditioning, tokens = pipeline.conditioning([pipeline.complete(GenerationRequest(long_prompt, NEGATIVE))])
    assert tokens.chunks == (1, 2)
    assert conditioning["encoder_hidden_states"].shape == (2, 2 * 77, first.width + second.width)
    ids = pipeline.text_tokens([NEGATIVE, long_prompt])["text_encoder_2"].ids
    pooled = pipeline.runners["text_encoder_2"].run({"input_ids": ids[:, :77]})["pooled_embeddings"]
    np.testing.assert_array_equal(conditioning["text_embeds"], pooled)
    second_chunk = pipeline.runners["text_encoder_2"].run({"input_ids": ids[:, 77:]})["text_embeddings"]
    np.testing.assert_array_equal(conditioning["encoder_hidden_states"][:, 77:, first.width:], second_chunk)


def test_defaults_are_the_output_size_and_no_crop(pipeline):
    completed = pipeline.complete(request())
    assert (completed.original_size, completed.crop, completed.target_size) == ((SIZE, SIZE), (0, 0), (SIZE, SIZE))
    default = pipeline.generate(request()).decoded
    explicit = pipeline.generate(request(original_size=(SIZE, SIZE), crop=(0, 0), target_size=(SIZE, SIZE))).decoded
    assert np.array_equal(default, explicit)


@pytest.mark.parametrize("field, value", [("original_size", (512, 256)), ("crop", (16, 32)), ("target_size", (128, 128))])
def test_each_size_value_reaches_the_unet(pipeline, field, value):
    changed = compare(pipeline.generate(request(**{field: value})).decoded, pipeline.generate(request()).decoded)
    assert changed.max_abs > 1e-3, f"{field} {value} left the image unchanged"


def test_the_size_conditioning_is_what_the_numpy_statement_embeds(pipeline):
    """The graph's own sinusoidal embedding of time_ids equals `conditioning_vector`'s (float64) within fp32."""
    import torch

    from sdcompile.models.unet import size_conditioning
    from sdrun.sdxl_conditioning import conditioning_vector

    pooled = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    sizes = np.array([SizeConditioning(1024, 768, 0, 0, 1024, 1024), SizeConditioning(512, 512, 32, 16, 768, 1024)],
                     np.float32)
    ours = size_conditioning(torch.from_numpy(pooled), torch.from_numpy(sizes), 256).numpy()
    np.testing.assert_allclose(ours, conditioning_vector(pooled, sizes, 256), atol=2e-4)


@pytest.mark.parametrize("args, message", [
    (["--original-size", "500", "512"], "--original-size must be two positive multiples of 8"),
    (["--target-size", "0", "512"], "--target-size must be two positive multiples of 8"),
    (["--crop", "-8", "0"], "--crop must be two non-negative multiples of 8"),
])
def test_bad_size_values_exit_2_without_a_png(xl, tmp_path, capsys, args, message):
    from sdrun.cli import main

    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exit_:
        main(["txt2img", "--bundle", str(xl.bundle), "--prompt", PROMPT, "--steps", "2", "--quiet",
              "--backend", "onnxruntime", "--out", str(out), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_size_options_on_a_model_without_size_conditioning_exit_2(tiny_bundle, tmp_path, capsys):
    from sdrun.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["txt2img", "--bundle", str(tiny_bundle), "--prompt", PROMPT, "--steps", "2", "--quiet",
              "--backend", "onnxruntime", "--out", str(tmp_path / "out.png"), "--crop", "0", "8"])
    assert exit_.value.code == 2 and "recipe tiny has no size conditioning" in capsys.readouterr().err


def test_the_png_records_the_size_conditioning(xl, tmp_path):
    from PIL import Image

    from sdrun.cli import main
    from tests.family_twin import cli

    out = tmp_path / "out.png"
    cli(main, "txt2img", "--bundle", str(xl.bundle), "--prompt", PROMPT, "--steps", "2", "--quiet",
        "--backend", "onnxruntime", "--out", str(out), "--original-size", "1024", "768")
    parameters = Image.open(out).info["parameters"]
    assert "Original size: 1024x768, Crop: 0x0, Target size: 64x64" in parameters


def test_the_eager_backend_gives_the_onnxruntime_image(xl, pipeline):
    """The torch backend runs the reference models behind every component, both encoders' outputs included."""
    from sdrun.session import load_pipeline

    eager = load_pipeline(xl.bundle, "torch", step_fusion=False).pipeline
    images = [p.generate(request()).decoded for p in (eager, pipeline)]
    assert compare(*images).max_abs <= 1e-3
