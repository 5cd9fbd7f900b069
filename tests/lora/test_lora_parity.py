"""LoRAs end to end on the tiny model, against diffusers on the same weights.

One random rank-4 LoRA made with PEFT and saved by diffusers, and its copy in the kohya layout: merged at
export (`sdcompile export --lora`, kohya file) the image equals diffusers' `load_lora_weights` +
`fuse_lora` within 1e-3 max abs (float images in [-1, 1]); swapped in at run time on ONNX Runtime
(`sdrun --lora`, diffusers file) the latents equal the merged bundle's within 1e-5 relative L2; two LoRAs
at scales 0.7 and -0.3 compose as diffusers' `set_adapters` does.
"""
from __future__ import annotations

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
LATENT_REL_L2 = 1e-5  # run-time swap vs export merge, both ONNX Runtime fp32
MIN_EFFECT = 0.05  # max abs change the LoRA makes to the image, so equality is not vacuous


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_recipe):
    directory = tmp_path_factory.mktemp("loras")
    first = peft_lora_file(tiny_recipe, directory / "first.safetensors", seed=1)
    second = peft_lora_file(tiny_recipe, directory / "second.safetensors", seed=2,
                            unet_targets=["to_k", "conv2", "proj_out", "ff.net.2"], text_targets=TEXT_TARGETS[2:3])
    return {"first": first, "first_kohya": kohya_copy(first, directory / "first_kohya.safetensors"),
            "second": second}


@pytest.fixture(scope="module")
def merged_bundle(tmp_path_factory, loras):
    from sdcompile.cli import cli

    out = tmp_path_factory.mktemp("bundles") / "tiny-lora"
    components = [arg for name in ("text_encoder", "unet", "unet_step", "vae_decoder") for arg in ("--component", name)]
    result = CliRunner().invoke(cli, ["export", "--recipe", "tiny", "--random-weights", "--out", str(out), *components,
                                      "--no-verify", "--lora", f"{loras['first_kohya']}:{SCALE}"])
    assert result.exit_code == 0, result.output
    return out


def generate(bundle, loras=()):
    from sdrun.lora import LoraRequest
    from sdrun.pipeline import GenerationRequest
    from sdrun.session import load_pipeline

    noise = np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    loaded = load_pipeline(bundle, "onnxruntime", loras=[LoraRequest(path, scale) for path, scale in loras])
    request = GenerationRequest(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE,
                                init_noise=noise, sampler=SAMPLER)
    return loaded.pipeline.generate(request), noise


def diffusers_image(recipe, loras, noise):
    from benchmarks.peer import run_peer

    pipe = diffusers_with_loras(recipe, loras)
    pipe.scheduler = diffusers_scheduler(SAMPLER, recipe)
    return run_peer(pipe, PROMPT, NEGATIVE, STEPS, GUIDANCE, noise, SIZE, SIZE)


def test_export_merge_equals_diffusers_fuse_lora(merged_bundle, tiny_bundle, loras, tiny_recipe):
    ours, noise = generate(merged_bundle)
    theirs = diffusers_image(tiny_recipe, [(loras["first"], SCALE)], noise)
    error = float(np.abs(np.clip(ours.decoded, -1, 1) - theirs).max())
    effect = float(np.abs(generate(tiny_bundle)[0].decoded - ours.decoded).max())
    print(f"\nexport --lora vs diffusers fuse_lora: max abs {error:.2e} (LoRA effect {effect:.2f})")
    assert error < IMAGE_MAX_ABS and effect > MIN_EFFECT


def test_run_time_swap_equals_export_merge(merged_bundle, tiny_bundle, loras):
    merged, _ = generate(merged_bundle)
    swapped, _ = generate(tiny_bundle, [(loras["first"], SCALE)])
    rel_l2 = float(np.linalg.norm(swapped.latents - merged.latents) / np.linalg.norm(merged.latents))
    print(f"\nsdrun --lora vs export --lora: latents rel L2 {rel_l2:.2e}")
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
