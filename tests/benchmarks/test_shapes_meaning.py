"""The meaning checks of `benchmarks/shapes/meaning.py`, and that a trained tiny-shapes passes them.

The rules run in the default tier on drawn images, which the pixel judge reads perfectly. The trained model's
checks (exported from `recipes/weights/tiny-shapes.safetensors` through the CLI, on fp32 and fp16, with img2img,
with samplers on the step-fused UNet, behind the server) are in the slow tier and need the trained file
(`make train-tiny`); `make bench-shapes` reports the same numbers with the confusion tables."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.shapes import meaning
from benchmarks.shapes.bench import IMG2IMG_STRENGTH, WEIGHTS, image_psnr
from benchmarks.shapes.train import WEIGHT_BUDGET_BYTES, sidecar_path
from sdrun.samplers.registry import SAMPLERS

FP16_PSNR_DB = 35.0  # the least mean PSNR of fp16 images against fp32 ones
GUIDANCE_DROP = 0.10  # guidance 1 loses at least this much colour accuracy
SUBSET = meaning.prompt_set()[::3]  # 12 prompts: every shape, colour and background, both word orders
TRAINED = (pytest.mark.slow, pytest.mark.skipif(not WEIGHTS.exists(), reason=f"{WEIGHTS.name} is not trained yet: "
                                                "`make train-tiny` writes it"))


def drawn(asked) -> np.ndarray:
    """(N, 64, 64, 3) uint8: each case's prompt drawn exactly, a 30-pixel shape at the centre."""
    from benchmarks.shapes.data import Labels, draw

    return np.stack([draw(Labels(c.asked.shape, c.asked.colour, c.asked.background, (17, 17, 46, 46)))
                     for c in asked])


def test_the_prompt_set_covers_every_colour_pair_and_both_word_orders():
    prompts = meaning.prompt_set()
    assert len(prompts) == 36 and len(meaning.cases()) == 72
    assert {(p.colour, p.background) for p in prompts[:30]} == {
        (c, b) for c in meaning.data.COLOURS for b in meaning.data.COLOURS if c != b}
    assert all(p.colour != p.background for p in prompts)
    assert "background with a" in prompts[-1].prompt


def test_drawn_prompts_score_perfectly_and_fill_the_confusion_diagonal():
    asked = meaning.cases()
    score = meaning.Score.of(asked, drawn(asked))
    assert score.meets_bars() and score.accuracy("shape") == 1.0 and score.misses() == []
    table = score.confusion("colour")
    assert table.sum() == 72 and np.trace(table) == 72 and table[:, -1].sum() == 0


def test_a_wrong_colour_is_a_miss_in_its_confusion_cell():
    asked = meaning.cases(meaning.prompt_set()[:1], seeds=(0,))  # a red circle on green
    image = drawn(asked)
    image[(image == (255, 0, 0)).all(axis=-1)] = (0, 0, 255)  # the red circle painted blue
    score = meaning.Score.of(asked, image)
    assert score.accuracy("colour") == 0.0 and score.accuracy("background") == 1.0
    assert score.confusion("colour")[0, meaning.data.COLOURS.index("blue")] == 1 and len(score.misses()) == 1


def test_the_demo_grid_has_a_labelled_cell_per_prompt():
    from benchmarks.shapes.grid import COLUMNS, DEMO_PROMPTS, ZOOM, draw_grid

    asked = [meaning.Case(p, 0) for p in DEMO_PROMPTS]
    grid = draw_grid(drawn(asked), [p.prompt for p in DEMO_PROMPTS])
    assert grid.width >= COLUMNS * 64 * ZOOM and grid.height >= 2 * 64 * ZOOM


def load(bundle, step_fusion=False):
    from sdrun.session import load_pipeline

    return load_pipeline(bundle, "onnxruntime", step_fusion=step_fusion, img2img=True).pipeline


@pytest.fixture(scope="module")
def fp32(shapes_bundle):
    return load(shapes_bundle("fp32"))


@pytest.fixture(scope="module")
def fp32_images(fp32):
    return meaning.generate(fp32, meaning.cases())


def assert_meets_bars(score: meaning.Score) -> None:
    tables = "\n".join(meaning.confusion_markdown(score.confusion(f)) for f in ("colour", "background"))
    assert score.meets_bars(), (f"colour {score.accuracy('colour'):.1%}, background {score.accuracy('background'):.1%}"
                                f"\n{tables}\n" + "\n".join(score.misses()))


@TRAINED[0]
@TRAINED[1]
def test_the_committed_weights_are_what_their_sidecar_says():
    from sdrun.bundle import sha256_file

    sidecar = json.loads(sidecar_path(WEIGHTS).read_text())
    assert WEIGHTS.stat().st_size <= WEIGHT_BUDGET_BYTES
    assert sidecar["weights"]["sha256"] == sha256_file(WEIGHTS)
    assert sidecar["recipe"] == "tiny-shapes" and len(sidecar["provenance"]["commit"]) == 40
    assert sidecar["losses"]["unet"]["loss_last"] < sidecar["losses"]["unet"]["loss_first"]


@TRAINED[0]
@TRAINED[1]
def test_fp32_draws_the_prompted_colours_and_guidance_1_does_worse(fp32, fp32_images):
    guided = meaning.Score.of(meaning.cases(), fp32_images)
    assert_meets_bars(guided)
    unguided = meaning.Score.of(meaning.cases(), meaning.generate(fp32, meaning.cases(), guidance=1.0))
    assert unguided.accuracy("colour") <= guided.accuracy("colour") - GUIDANCE_DROP


@TRAINED[0]
@TRAINED[1]
def test_fp16_draws_the_prompted_colours_within_35_db_of_fp32(shapes_bundle, fp32_images):
    images = meaning.generate(load(shapes_bundle("fp16")), meaning.cases())
    assert_meets_bars(meaning.Score.of(meaning.cases(), images))
    psnr_db = image_psnr(fp32_images, images)
    assert np.mean(np.minimum(psnr_db, 100.0)) >= FP16_PSNR_DB, psnr_db


@TRAINED[0]
@TRAINED[1]
def test_img2img_from_a_generated_image_keeps_its_colours(fp32, fp32_images):
    images = meaning.generate(fp32, meaning.cases(), images=fp32_images, strength=IMG2IMG_STRENGTH)
    assert_meets_bars(meaning.Score.of(meaning.cases(), images))


@pytest.fixture(scope="module")
def fused(shapes_bundle):
    return load(shapes_bundle("fp32"), step_fusion=True)


@TRAINED[0]
@TRAINED[1]
@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"lcm"}))  # LCM needs a consistency-distilled model
def test_every_sampler_on_the_step_fused_unet_draws_the_prompted_colours(fused, sampler):
    asked = meaning.cases(SUBSET, seeds=(0,))
    assert_meets_bars(meaning.Score.of(asked, meaning.generate(fused, asked, sampler=sampler)))


@TRAINED[0]
@TRAINED[1]
def test_the_server_draws_the_prompted_colours(shapes_bundle, tmp_path):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the serve extra) is not installed")
    from benchmarks.server_process import running_server
    from sdrun.serve.client import remote_generate, request_tensors

    asked = meaning.cases(SUBSET, seeds=(0,))
    with running_server(shapes_bundle("fp32"), tmp_path / "serve.log", models=("txt2img",)) as server:
        images = [remote_generate(server.url, "txt2img", request_tensors(
            "txt2img", {"prompt": c.asked.prompt, "seed": c.seed}), 120)[0] for c in asked]
    assert_meets_bars(meaning.Score.of(asked, np.stack(images)))
