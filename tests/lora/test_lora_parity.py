"""LoRAs end to end on the tiny models of SD1 and SD2, against diffusers on the same weights.

One random rank-4 LoRA made with PEFT and saved by diffusers, and its copy in the kohya layout: merged at
export (`sdcompile export --lora`, kohya file) the image equals diffusers' `load_lora_weights` +
`fuse_lora` within 1e-3 max abs (float images in [-1, 1]), and the text encoder's hidden states equal
PEFT's merge into transformers' CLIPTextModel (which diffusers converts SD2's OpenCLIP encoder to) within
1e-5 relative L2; swapped in at run time on ONNX Runtime (`sdrun --lora`, diffusers file) the latents
equal the merged bundle's within 1e-5 relative L2; two LoRAs at scales 0.7 and -0.3 compose as
diffusers' `set_adapters` does.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.runtime.test_sampler_pipeline import diffusers_scheduler
from tests.lora.lora_files import TEXT_TARGETS, diffusers_with_loras, kohya_copy, peft_lora_file

PROMPT, NEGATIVE = "a lighthouse on a cliff at dawn", "blurry"
STEPS, GUIDANCE, SIZE = 6, 7.5, 64
SCALE = 0.8
SAMPLER = "euler"  # diffusers' EulerDiscreteScheduler from SD's published config, as the sampler tests build it
IMAGE_MAX_ABS = 1e-3  # vs diffusers, float images in [-1, 1]
# Run-time swap vs export merge, both ONNX Runtime fp32. Their weights are equal bit for bit (checked); the
# latents differ as ONNX Runtime's optimization levels do (a session with swapped weights runs one level
# down): measured after 6 steps 4.7e-6 on tiny, 2.0e-5 on tiny-v.
LATENT_REL_L2 = 5e-5
TEXT_REL_L2 = 1e-5  # merged text encoder vs PEFT's merge into transformers' CLIPTextModel, torch fp32
MIN_EFFECT = 0.05  # max abs change the LoRA makes to the image, so equality is not vacuous


TWINS = ("tiny", "tiny-v")  # SD1 and SD2 (OpenCLIP text encoder, stacked q/k/v)
# Tests that export bundles: SD2's run in the slow tier (two more exports); its text encoder merge stays here.
BUNDLE_TWINS = ("tiny", pytest.param("tiny-v", marks=pytest.mark.slow))
BUNDLE_COMPONENTS = ("text_encoder", "unet", "unet_step", "vae_decoder")


@dataclasses.dataclass
class Twin:
    recipe: object
    loras: dict[str, Path]  # first (diffusers file), first_kohya (its kohya copy), second
    make_bundles: object  # () -> (plain, merged), exported on first use

    @functools.cached_property
    def bundles(self) -> tuple[Path, Path]:
        return self.make_bundles()

    @property
    def plain(self) -> Path:
        """The bundle without LoRAs."""
        return self.bundles[0]

    @property
    def merged(self) -> Path:
        """The bundle exported with `first_kohya` at SCALE."""
        return self.bundles[1]


def export(recipe_name, out, *args, components=BUNDLE_COMPONENTS):
    from sdcompile.cli import cli

    components = [arg for name in components for arg in ("--component", name)]
    result = CliRunner().invoke(cli, ["export", "--recipe", recipe_name, "--random-weights", "--out", str(out),
                                      *components, "--no-verify", *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def twins(tmp_path_factory, tiny_bundle):
    """Per recipe name, built on first use: its LoRAs and bundles (tiny's plain bundle is the session's)."""
    from sdcompile.recipes import load_recipe

    built = {}

    def twin(name: str) -> Twin:
        if name not in built:
            recipe, directory = load_recipe(name), tmp_path_factory.mktemp(f"loras-{name}")
            first = peft_lora_file(recipe, directory / "first.safetensors", seed=1)
            second = peft_lora_file(recipe, directory / "second.safetensors", seed=2,
                                    unet_targets=["to_k", "conv2", "proj_out", "ff.net.2"],
                                    text_targets=TEXT_TARGETS[2:3])
            loras = {"first": first, "first_kohya": kohya_copy(first, directory / "first_kohya.safetensors"),
                     "second": second}

            def make_bundles(name=name, loras=loras):
                bundles = tmp_path_factory.mktemp(f"bundles-{name}")
                plain = tiny_bundle if name == "tiny" else export(name, bundles / "plain")
                return plain, export(name, bundles / "lora", "--lora", f"{loras['first_kohya']}:{SCALE}")

            built[name] = Twin(recipe, loras, make_bundles)
        return built[name]

    return twin


@pytest.fixture(scope="module")
def loras(twins):
    return twins("tiny").loras


@pytest.fixture(scope="module")
def merged_bundle(twins):
    return twins("tiny").merged


def generate(bundle, loras=()):
    from sdrun.lora import LoraRequest
    from sdrun.pipeline import GenerationRequest
    from sdrun.session import load_pipeline

    noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    loaded = load_pipeline(bundle, "onnxruntime", loras=[LoraRequest(path, scale) for path, scale in loras])
    request = GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE,
                                init_noise=noise, sampler=SAMPLER)
    return loaded.pipeline.generate(request), noise


def initializers(graph: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(str(graph)).graph.initializer}


def relative_l2(ours, theirs) -> float:
    return float(np.linalg.norm(np.asarray(ours) - np.asarray(theirs)) / np.linalg.norm(np.asarray(theirs)))


def text_hidden_states(encoder, config) -> np.ndarray:
    """(1, context_length, width) hidden states of our text encoder or transformers' CLIPTextModel, for seeded
    token ids."""
    import torch

    ids = torch.from_numpy(np.random.default_rng(3).integers(0, config.vocab_size, (1, config.context_length)))
    with torch.no_grad():
        output = encoder(ids)
    return (output if isinstance(output, torch.Tensor) else output.last_hidden_state).numpy()


def diffusers_image(recipe, loras, noise):
    from benchmarks.peer import run_peer

    pipe = diffusers_with_loras(recipe, loras)
    pipe.scheduler = diffusers_scheduler(SAMPLER, recipe)
    return run_peer(pipe, PROMPT, NEGATIVE, STEPS, GUIDANCE, noise, SIZE, SIZE)


@pytest.mark.parametrize("recipe_name", BUNDLE_TWINS)
def test_export_merge_equals_diffusers_fuse_lora(recipe_name, twins):
    twin = twins(recipe_name)
    ours, noise = generate(twin.merged)
    theirs = diffusers_image(twin.recipe, [(twin.loras["first"], SCALE)], noise)
    error = float(np.abs(np.clip(ours.decoded, -1, 1) - theirs).max())
    effect = float(np.abs(generate(twin.plain)[0].decoded - ours.decoded).max())
    print(f"\n{recipe_name} export --lora vs diffusers fuse_lora: max abs {error:.2e} (LoRA effect {effect:.2f})")
    assert error < IMAGE_MAX_ABS and effect > MIN_EFFECT


@pytest.mark.parametrize("recipe_name", TWINS)
def test_merged_text_encoder_equals_peft_merged_transformers_encoder(recipe_name, twins):
    from sdcompile.weights import RandomWeights, load_models
    from sdcompile.weights.lora_merge import LoraMerge
    from sdcompile.weights.layout import Component
    from sdrun.lora import LoraRequest

    twin = twins(recipe_name)
    models = load_models(twin.recipe, RandomWeights(0), parts=[Component.TEXT_ENCODER])
    config = twin.recipe.text_encoder
    before = text_hidden_states(models.text_encoder, config)
    LoraMerge([LoraRequest(twin.loras["first_kohya"], SCALE)], twin.recipe).apply_(models, Component.TEXT_ENCODER)
    ours = text_hidden_states(models.text_encoder, config)
    theirs = text_hidden_states(diffusers_with_loras(twin.recipe, [(twin.loras["first"], SCALE)]).text_encoder,
                                config)
    rel_l2, effect = relative_l2(ours, theirs), relative_l2(before, theirs)
    print(f"\n{recipe_name} merged text encoder vs PEFT merge: hidden states rel L2 {rel_l2:.2e} (effect {effect:.2f})")
    assert rel_l2 < TEXT_REL_L2 and effect > MIN_EFFECT


@pytest.mark.parametrize("recipe_name", BUNDLE_TWINS)
def test_run_time_swap_writes_the_merged_weights_bit_for_bit(recipe_name, twins):
    twin = twins(recipe_name)
    assert_swap_writes_the_merged_weights(twin.plain, twin.merged, twin.loras["first"], SCALE,
                                          [name for name in BUNDLE_COMPONENTS if name != "vae_decoder"])


def assert_swap_writes_the_merged_weights(plain_root: Path, merged_root: Path, lora: Path, scale: float,
                                          components: list[str]) -> None:
    """`lora` swapped into the plain bundle replaces exactly the initializers the merged bundle changed, with
    the merged bundle's values bit for bit."""
    from sdrun.bundle import open_bundle
    from sdrun.lora import LoraRequest
    from sdrun.lora.swap import lora_overrides

    bundle = open_bundle(plain_root, lambda manifest: components)
    overrides, _ = lora_overrides(bundle, components, [LoraRequest(lora, scale)])
    for component in components:
        plain, merged = (initializers(root / component / "model.onnx") for root in (plain_root, merged_root))
        changed = {name for name, value in merged.items() if not np.array_equal(value, plain[name])}
        swapped = overrides.get(component, {})
        assert changed and set(swapped) == changed, component
        for name, value in swapped.items():
            np.testing.assert_array_equal(value, merged[name], err_msg=f"{component}.{name}")


@pytest.mark.parametrize("recipe_name", BUNDLE_TWINS)
def test_run_time_swap_equals_export_merge(recipe_name, twins):
    twin = twins(recipe_name)
    merged, _ = generate(twin.merged)
    swapped, _ = generate(twin.plain, [(twin.loras["first"], SCALE)])
    rel_l2 = relative_l2(swapped.latents, merged.latents)
    print(f"\n{recipe_name} sdrun --lora vs export --lora: latents rel L2 {rel_l2:.2e}")
    assert rel_l2 < LATENT_REL_L2


def test_two_loras_compose_like_diffusers_set_adapters(tiny_bundle, loras, tiny_recipe):
    pair = [(loras["first"], 0.7), (loras["second"], -0.3)]
    ours, noise = generate(tiny_bundle, pair)
    theirs = diffusers_image(tiny_recipe, pair, noise)
    error = float(np.abs(np.clip(ours.decoded, -1, 1) - theirs).max())
    print(f"\ntwo LoRAs (0.7, -0.3) vs diffusers set_adapters: max abs {error:.2e}")
    assert error < IMAGE_MAX_ABS


def test_manifest_records_the_merged_lora(merged_bundle, tiny_bundle, loras):
    from sdrun.bundle import read_manifest, sha256_file

    manifest = read_manifest(merged_bundle)
    assert manifest.loras == [{"file": "first_kohya.safetensors", "sha256": sha256_file(loras["first_kohya"]),
                               "scale": SCALE, "tensors": {"text_encoder": 10, "unet": 79}}]
    assert manifest.weights_sha256 != read_manifest(tiny_bundle).weights_sha256  # the hash is of merged weights


def test_prompt_tags_load_from_the_lora_dir_and_are_recorded(tiny_bundle, loras, tmp_path, capsys):
    from PIL import Image

    from sdrun.bundle import sha256_file
    from sdrun.cli import main

    out = tmp_path / "tagged.png"
    prompt = f"a lighthouse <lora:first:{SCALE}> at dawn"
    main(["txt2img", "--bundle", str(tiny_bundle), "--prompt", prompt, "--lora-dir", str(loras["first"].parent),
          "--steps", "2", "--backend", "onnxruntime", "--out", str(out)])
    assert "of which LoRA" in capsys.readouterr().err  # the timing table's row
    parameters = Image.open(out).text["parameters"]
    assert parameters.startswith(prompt)
    assert f'Lora hashes: "first: {sha256_file(loras["first"])[:12]}"' in parameters
    assert f'Lora: "first:{SCALE:g}"' in parameters


def test_fp16_bundle_swap_passes_the_fp16_gate_against_the_fp32_merge(merged_bundle, tiny_bundle_fp16, loras):
    from sdrun import gates

    merged = generate(merged_bundle)[0].images / 255.0
    verdicts = {}
    for name, swapped in (("swapped", [(loras["first"], SCALE)]), ("unswapped", [])):
        stats = gates.output_statistics("images", merged, generate(tiny_bundle_fp16, swapped)[0].images / 255.0)
        verdicts[name] = gates.pipeline_image_gate("fp16").judge(f"fp16 bundle {name} vs fp32 merge", stats)
        print(f"\n{verdicts[name].describe()}")
    assert verdicts["swapped"].passed and not verdicts["unswapped"].passed  # the fp16 weights did change


@pytest.mark.slow  # a whole export with external data (30 s); the swap itself is in the default tier
def test_swap_reads_the_weights_from_external_data_as_from_the_graph(tiny_bundle, loras, tmp_path):
    from sdcompile.cli import cli
    from sdrun.bundle import open_bundle
    from sdrun.lora import LoraRequest
    from sdrun.lora.swap import lora_overrides

    external = tmp_path / "external"
    components = [arg for name in ("text_encoder", "unet") for arg in ("--component", name)]
    result = CliRunner().invoke(cli, ["export", "--recipe", "tiny", "--random-weights", "--out", str(external),
                                      *components, "--external-data", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert (external / "unet" / "model.onnx.data").is_file()
    request = [LoraRequest(loras["first"], SCALE)]
    overrides = {}
    for root in (tiny_bundle, external):
        bundle = open_bundle(root, lambda manifest: ["text_encoder", "unet"])
        overrides[root], _ = lora_overrides(bundle, ["text_encoder", "unet"], request)
    embedded, spilled = overrides[tiny_bundle], overrides[external]
    assert {k: sorted(v) for k, v in embedded.items()} == {k: sorted(v) for k, v in spilled.items()}
    for component, values in embedded.items():
        for name, value in values.items():
            assert value.dtype == spilled[component][name].dtype
            np.testing.assert_array_equal(value, spilled[component][name], err_msg=f"{component}.{name}")


def test_a_pickled_lora_merges_at_export_as_its_safetensors_copy_and_is_refused_at_run_time(
        merged_bundle, tiny_bundle, loras, tmp_path, capsys):
    import safetensors.torch
    import torch

    from sdrun.bundle import read_manifest
    from sdrun.cli import main

    pickled = tmp_path / "first_kohya.pt"
    torch.save(safetensors.torch.load_file(str(loras["first_kohya"])), pickled)
    from sdcompile.cli import cli

    out = tmp_path / "from-pt"
    result = CliRunner().invoke(cli, ["export", "--recipe", "tiny", "--random-weights", "--out", str(out),
                                      "--component", "text_encoder", "--no-verify", "--lora", f"{pickled}:{SCALE}"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out).weights_sha256 == read_manifest(merged_bundle).weights_sha256
    with pytest.raises(SystemExit) as exited:
        main(["txt2img", "--bundle", str(tiny_bundle), "--prompt", "a", "--lora", str(pickled), "--steps", "1",
              "--backend", "onnxruntime", "--out", str(tmp_path / "no.png")])
    assert exited.value.code == 2 and "merge it at export" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()
