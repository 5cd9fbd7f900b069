"""Long and weighted prompts end to end on the tiny bundle: the chunked, weighted context equals the web UI's
rule on transformers' CLIPTextModel; the UNet graphs take a two-chunk context; `sdrun txt2img` reads every
token of a long prompt and refuses what it cannot read."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sdrun.cli import cli
from sdrun.errors import UserError
from sdrun.pipeline import GenerationRequest, complete_request
from tests.runtime.test_prompt_chunks import CHUNK, reference_batch

WEIGHTED_REL_L2 = 1e-6  # our ORT encoder + numpy weighting vs transformers' CLIPTextModel + torch float64 weighting
PROMPT = "a (red:1.4) fox in the snow, " * 4 + "[[blurry]] BREAK ((sharp focus)), (golden hour:0.8)"
NEGATIVE = "ugly, (bad hands:1.3)"


def relative_l2(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def hf_clip_text_model(recipe, seed: int = 0):
    """transformers' CLIPTextModel holding the tiny recipe's seeded random text encoder weights."""
    import transformers

    from sdcompile.weights import RandomWeights, load_models
    from sdcompile.weights.layout import Component

    config = recipe.text_encoder
    ours = load_models(recipe, RandomWeights(seed), parts=[Component.TEXT_ENCODER]).text_encoder
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        max_position_embeddings=config.context_length, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        attn_implementation="eager")).eval()
    wrapper = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    model.load_state_dict({wrapper + k.removeprefix("transformer.text_model."): v for k, v in ours.state_dict().items()
                           if not k.endswith("position_ids")}, strict=True)
    return model


def web_ui_context(hf_model, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each 77-token chunk through CLIPTextModel, scaled per token, each row's chunk mean restored (float64)."""
    chunks = []
    for c in range(ids.shape[1] // (CHUNK + 2)):
        window = slice(c * (CHUNK + 2), (c + 1) * (CHUNK + 2))
        with torch.no_grad():
            z = hf_model(input_ids=torch.from_numpy(ids[:, window]).long()).last_hidden_state.double()
        w = torch.from_numpy(weights[:, window]).double()[..., None]
        before = z.mean(dim=(1, 2), keepdim=True)
        weighted = z * w
        chunks.append(weighted * (before / weighted.mean(dim=(1, 2), keepdim=True)))
    return torch.cat(chunks, dim=1).numpy()


def test_weighted_long_prompt_context_equals_the_rule_on_transformers_clip(tiny_bundle, tiny_recipe):
    from sdrun.backends import make_runners
    from sdrun.bundle import open_bundle
    from sdrun.pipeline import Pipeline

    bundle = open_bundle(tiny_bundle, lambda manifest: ["text_encoder"])
    pipeline = Pipeline(bundle, make_runners("onnxruntime", bundle, ["text_encoder"]))
    request = complete_request(GenerationRequest(PROMPT, NEGATIVE), bundle.recipe)
    conditioning, tokens = pipeline.conditioning([request])
    ours = conditioning["encoder_hidden_states"]
    assert ours.shape == (2, 2 * 77, tiny_recipe.text_encoder.width) and tokens.chunks == (1, 2)

    hf_model = hf_clip_text_model(tiny_recipe)
    ids, weights = reference_batch(bundle.tokenizer, [NEGATIVE, PROMPT], bundle.tokenizer.end_id)
    theirs = web_ui_context(hf_model, ids, weights)
    error = relative_l2(ours, theirs)
    print(f"\nweighted two-chunk context vs transformers CLIPTextModel: rel L2 {error:.2e}")
    assert error <= WEIGHTED_REL_L2, f"rel L2 {error:.2e} > {WEIGHTED_REL_L2:.0e}"
    unweighted = web_ui_context(hf_model, ids, np.ones_like(weights))
    assert relative_l2(unweighted, theirs) > 100 * WEIGHTED_REL_L2  # the weights do change the context


@pytest.mark.parametrize("component", ["unet", "unet_step"])
def test_exported_unet_graphs_take_a_two_chunk_context(tiny_bundle, tiny_recipe, component):
    import onnxruntime as ort

    from sdcompile.components import component_spec
    from sdcompile.components.spec import verify_binding

    spec = component_spec(component, tiny_recipe)
    binding = verify_binding(tiny_recipe)
    feeds = {k: v.numpy() for k, v in spec.sample(tiny_recipe, binding, torch.Generator().manual_seed(0)).items()}
    session = ort.InferenceSession(str(tiny_bundle / component / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = {}
    for tokens in (77, 154):
        context = feeds["encoder_hidden_states"]
        feeds["encoder_hidden_states"] = np.concatenate([context[:, :77]] * (tokens // 77), axis=1)
        outputs[tokens] = session.run(None, feeds)[0]
        assert np.isfinite(outputs[tokens]).all()
    assert outputs[154].shape == outputs[77].shape


def _txt2img(bundle, out, prompt, *extra):
    result = CliRunner().invoke(cli, ["txt2img", "--bundle", str(bundle), "--prompt", prompt, "--steps", "3",
                                      "--quiet", "--backend", "onnxruntime", "--out", str(out), *map(str, extra)],
                                standalone_mode=False, catch_exceptions=True)
    if isinstance(result.exception, UserError):
        return 2, result.exception.message()
    assert result.exception is None, result.exception
    return 0, result.stderr


def test_the_last_tokens_of_a_150_token_prompt_change_the_image(tiny_bundle, tmp_path):
    words = ["cat", "dog", "red", "blue", "tree", "house", "sky", "sea", "car", "road"]
    head = " ".join(words[i % 10] for i in range(80))
    tails = [" ".join(words[(i * k) % 10] for i in range(70)) for k in (3, 7)]
    assert len(head.split()) + 70 == 150  # one token per word: two chunks, no comma or BREAK
    images = []
    for n, tail in enumerate(tails):
        code, _ = _txt2img(tiny_bundle, tmp_path / f"{n}.png", f"{head} {tail}")
        assert code == 0
        images.append(np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.int16))
    changed = np.abs(images[0] - images[1])
    print(f"\n150-token prompts differing in their last 70 tokens: max |Δ| {changed.max()} of 255, "
          f"{(changed > 0).mean():.0%} of pixel channels changed")
    assert changed.max() > 0
    assert "Steps: 3" in Image.open(tmp_path / "0.png").text["parameters"]


def test_a_prompt_past_max_chunks_is_refused_without_a_png(tiny_bundle, tmp_path):
    code, message = _txt2img(tiny_bundle, tmp_path / "long.png", "word " * 80, "--max-chunks", 1)
    assert code == 2 and "2 chunks" in message and "--max-chunks" in message
    assert not (tmp_path / "long.png").exists()
    code, message = _txt2img(tiny_bundle, tmp_path / "long.png", "x", "--max-chunks", 4)
    assert code == 2 and "more than this bundle's UNet takes" in message
    code, message = _txt2img(tiny_bundle, tmp_path / "long.png", "word " * 300)
    assert code == 2 and "4 chunks" in message and not (tmp_path / "long.png").exists()


def test_unbalanced_brackets_warn_and_a_non_numeric_weight_is_refused(tiny_bundle, tmp_path):
    code, stderr = _txt2img(tiny_bundle, tmp_path / "warned.png", "a (red cube")
    assert code == 0 and "warning:" in stderr and "never closed" in stderr
    assert (tmp_path / "warned.png").exists()
    code, message = _txt2img(tiny_bundle, tmp_path / "bad.png", "a (red:abc) cube")
    assert code == 2 and "(red:abc)" in message and not (tmp_path / "bad.png").exists()
