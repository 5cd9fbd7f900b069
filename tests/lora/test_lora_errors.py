"""Bad LoRA input is refused with a UserError (exit 2) that says what was expected, before anything is
written: by `sdrun txt2img --lora` (no PNG) and by `sdcompile export --lora` (no bundle).

The files are kohya-layout LoRAs written here (down, up and a 0-dim alpha per module) for the tiny model,
whose UNet has two levels and 32/64 channels.
"""
from __future__ import annotations

import numpy as np
import pytest

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a (32, 32) linear weight
RANK = 4


def kohya_file(path, modules: dict[str, tuple[tuple, tuple]], fill=None):
    """`modules`: kohya module name -> (down shape, up shape); values seeded random unless `fill`."""
    import safetensors.numpy

    rng = np.random.default_rng(0)
    tensors = {}
    for name, (down, up) in modules.items():
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal(down, dtype=np.float32)
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal(up, dtype=np.float32) if fill is None else \
            np.full(up, fill, np.float32)
        tensors[f"{name}.alpha"] = np.array(down[0], np.float32)
    safetensors.numpy.save_file(tensors, str(path))
    return path


def truncated(path):
    data = kohya_file(path, {Q: ((RANK, 32), (32, RANK))}).read_bytes()
    path.write_bytes(data[:-10])
    return path


CASES = {
    # another architecture: SD 1.5's four UNet levels, of which the tiny model has two
    "foreign": (lambda p: kohya_file(p, {Q: ((RANK, 32), (32, RANK)),
                                         "lora_unet_down_blocks_3_resnets_0_conv1": ((RANK, 1280, 3, 3), (1280, RANK, 1, 1)),
                                         "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k": (
                                             (RANK, 768), (320, RANK))}),
                "2 of its 3 unet modules match no weight"),
    "no_such_tensor": (lambda p: kohya_file(p, {Q.replace("to_q", "to_z"): ((RANK, 32), (32, RANK))}),
                       "match no weight"),
    "shape": (lambda p: kohya_file(p, {Q: ((RANK, 48), (32, RANK))}), "does not fit weight"),
    "nan": (lambda p: kohya_file(p, {Q: ((RANK, 32), (32, RANK))}, fill=np.nan), "NaN"),
    "truncated": (truncated, "truncated"),
    "sdxl_text_encoder": (lambda p: kohya_file(p, {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (
        (RANK, 32), (32, RANK))}), "text_encoder_2. keys are SDXL's"),
}


def run_sdrun(args):
    from sdrun.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


@pytest.mark.parametrize("case", CASES)
def test_sdrun_refuses_a_bad_lora_and_writes_no_png(case, tiny_bundle, tmp_path, capsys):
    make, message = CASES[case]
    lora = make(tmp_path / f"{case}.safetensors")
    out = tmp_path / "o.png"
    code = run_sdrun(["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x", "--backend", "onnxruntime",
                      "--lora", str(lora), "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 2 and not out.exists() and message in error, error


@pytest.mark.parametrize("scale", ["abc", "nan", ""])
def test_a_scale_that_is_not_a_number_is_refused(scale, tiny_bundle, tmp_path, capsys):
    lora = kohya_file(tmp_path / "ok.safetensors", {Q: ((RANK, 32), (32, RANK))})
    code = run_sdrun(["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x", "--lora", f"{lora}:{scale}",
                      "--out", str(tmp_path / "o.png")])
    assert code == 2 and "not a number" in capsys.readouterr().err


def test_prompt_tags_need_a_lora_dir(tiny_bundle, tmp_path, capsys):
    code = run_sdrun(["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x <lora:style:0.5>",
                      "--out", str(tmp_path / "o.png")])
    assert code == 2 and "--lora-dir" in capsys.readouterr().err


@pytest.mark.parametrize("backend, message", [("torch", "merge the LoRA at export")])
def test_other_backends_refuse_run_time_loras(backend, message, tiny_bundle, tmp_path, capsys, monkeypatch):
    import sdrun.session

    monkeypatch.setattr(sdrun.session, "resolve_backend", lambda name, *args: name)  # no TensorRT needed here
    lora = kohya_file(tmp_path / "ok.safetensors", {Q: ((RANK, 32), (32, RANK))})
    code = run_sdrun(["txt2img", "--bundle", str(tiny_bundle), "--prompt", "x", "--backend", backend,
                      "--lora", str(lora), "--out", str(tmp_path / "o.png")])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("case", ["foreign", "shape", "nan", "truncated", "sdxl_text_encoder"])
def test_export_refuses_a_bad_lora_and_writes_no_bundle(case, tmp_path, capsys):
    from sdcompile.cli import main

    make, message = CASES[case]
    lora = make(tmp_path / f"{case}.safetensors")
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--recipe", "tiny", "--random-weights", "--out", str(out), "--lora", f"{lora}:0.5"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and message in error, error
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))
