"""Every sampler end to end: our ONNX Runtime pipeline against diffusers' pipeline.

The tiny recipe's fp32 bundle (random weights seed 0) and diffusers' `StableDiffusionPipeline` on
the same weights, with the sampler's scheduler built by `from_config` from SD's DDIM configuration,
the same prompt and the same initial noise: the decoded float images agree within 1e-3. Samplers
that draw fresh noise per step (Euler a, DPM++ 2M SDE, LCM) are handed our per-step noise through
diffusers' `randn_tensor`.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

from sdrun.gates import PEER_IMAGE
from sdrun.metrics import compare
from tests.runtime.samplers.diffusers_reference import PREDICTION_TYPE, SD_DDIM_CONFIG, reference_for

DETERMINISTIC = ["euler", "euler_karras", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "plms"]
PROMPT, NEGATIVE = "a lighthouse on a cliff at dawn", "blurry"
STEPS, GUIDANCE, SIZE = 10, 7.5, 64


@pytest.fixture(scope="module")
def peer(tiny_recipe):
    from benchmarks.peer import diffusers_pipeline_from_models
    from sdcompile.weights import RandomWeights, load_models

    return diffusers_pipeline_from_models(load_models(tiny_recipe, RandomWeights(0)), tiny_recipe)


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    from sdrun.session import load_pipeline

    return load_pipeline(tiny_bundle, "onnxruntime", step_fusion=False).pipeline


def diffusers_scheduler(sampler_id: str, recipe):
    import diffusers

    reference = reference_for(sampler_id)
    config = dict(SD_DDIM_CONFIG, prediction_type=PREDICTION_TYPE[recipe.parameterization.value])
    return getattr(diffusers, reference.cls).from_config(config, **reference.config)


@pytest.mark.parametrize("sampler_id", DETERMINISTIC)
def test_onnxruntime_image_equals_diffusers_with_the_same_scheduler(sampler_id, pipeline, peer, tiny_recipe):
    from benchmarks.peer import run_peer
    from sdrun.pipeline import GenerationRequest

    noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    ours = pipeline.generate(GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, height=SIZE,
                                               width=SIZE, init_noise=noise, sampler=sampler_id)).decoded
    peer.scheduler = diffusers_scheduler(sampler_id, tiny_recipe)
    theirs = run_peer(peer, PROMPT, NEGATIVE, STEPS, GUIDANCE, noise, SIZE, SIZE)
    verdict = PEER_IMAGE.judge(f"{sampler_id} vs diffusers", compare(np.clip(ours, -1, 1), theirs, 2.0).to_dict())
    print(f"\n{verdict.describe()}")
    assert verdict.passed, verdict.describe()


def test_sdrun_lists_the_samplers():
    from sdrun.cli import cli

    result = CliRunner().invoke(cli, ["samplers"])
    assert result.exit_code == 0 and "DPM++ 2M Karras" in result.output and "euler_a" in result.output


@pytest.mark.parametrize("extra, message", [
    (("--sampler", "no such sampler"), "DPM++ 2M Karras"),  # the error lists the valid names
    (("--sampler", "DDIM", "--karras"), "DDIM"),
    (("--sampler", "plms", "--steps", "1"), "PLMS"),
    (("--sampler", "Euler a", "--eta", "0.3"), "eta"),
])
def test_bad_sampler_options_exit_2_before_loading(tiny_bundle, tmp_path, extra, message):
    from sdrun.cli import main

    out = tmp_path / "o.png"
    with pytest.raises(SystemExit) as exit_:
        main(["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x", "--backend", "onnxruntime",
              "--out", str(out), *extra])
    assert exit_.value.code == 2 and not out.exists()


def test_the_png_names_the_sampler_as_the_web_uis_do(tiny_bundle, tmp_path):
    from PIL import Image

    from sdrun.cli import main

    out = tmp_path / "o.png"
    main(["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x", "--steps", "3", "--sampler", "dpmpp_2m",
          "--karras", "--backend", "onnxruntime", "--quiet", "--out", str(out)])
    assert "Sampler: DPM++ 2M Karras" in Image.open(out).text["parameters"]


STOCHASTIC = ["euler_a", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "lcm"]


def our_noises(pipeline, sampler_id: str, seed: int, shape: tuple) -> list:
    """The per-evaluation noise our pipeline draws: after the given initial noise, one standard normal
    tensor per evaluation that takes noise, from `default_rng(seed)` (None elsewhere)."""
    from sdrun.sampling import sampler_plan

    plan = sampler_plan(pipeline.recipe, sampler_id, STEPS, None, None, None, GUIDANCE)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) if needed else None for needed in plan.needs_noise]


@pytest.mark.parametrize("sampler_id", STOCHASTIC)
def test_stochastic_samplers_equal_diffusers_given_the_same_noise(sampler_id, pipeline, peer, tiny_recipe):
    """diffusers' schedulers draw step noise with `randn_tensor`; it is handed ours, step by step."""
    import importlib
    from unittest import mock

    import torch

    from benchmarks.peer import run_peer
    from sdrun.pipeline import GenerationRequest

    shape = (1, 4, SIZE // 8, SIZE // 8)
    noise = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    request = GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE,
                                init_noise=noise, sampler=sampler_id, seed=5)
    ours = pipeline.generate(request).decoded
    scheduler = peer.scheduler = diffusers_scheduler(sampler_id, tiny_recipe)
    # Where our plan takes no noise its scale is 0 (the final step); diffusers draws one there anyway.
    noises = [z if z is not None else np.zeros(shape, np.float32) for z in our_noises(pipeline, sampler_id, 5, shape)]
    given = lambda *args, **kwargs: torch.from_numpy(noises[scheduler.step_index])  # noqa: E731
    module = importlib.import_module(type(scheduler).__module__)
    with mock.patch.object(module, "randn_tensor", given, create=True):
        theirs = run_peer(peer, PROMPT, NEGATIVE, STEPS, GUIDANCE, noise, SIZE, SIZE)
    verdict = PEER_IMAGE.judge(f"{sampler_id} vs diffusers", compare(np.clip(ours, -1, 1), theirs, 2.0).to_dict())
    print(f"\n{verdict.describe()}")
    assert verdict.passed, verdict.describe()


def test_the_recipes_default_sampler_is_used_when_none_is_given(tiny_bundle, tmp_path):
    import json
    import shutil

    from PIL import Image

    from sdrun.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["recipe"]["default_sampler"] = "Euler a"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "o.png"
    main(["txt2img", "--bundle", str(bundle), "--prompt", "x", "--steps", "3", "--backend", "onnxruntime",
          "--quiet", "--out", str(out)])
    assert "Sampler: Euler a" in Image.open(out).text["parameters"]


def test_a_recipe_naming_no_sampler_is_refused(tiny_recipe):
    from sdrun.errors import UserError
    from sdrun.recipe import recipe_from_dict

    with pytest.raises(UserError, match=re.escape("default_sampler 'DPM++ 9M' is not a sampler")):
        recipe_from_dict({**tiny_recipe.to_dict(), "default_sampler": "DPM++ 9M"})
