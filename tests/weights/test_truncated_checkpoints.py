"""Checkpoints cut short, as an interrupted download leaves them: refused before any tensor is read
or any output written, naming the tensor that was cut, exit 2 through the CLI.

Byte ranges are computed here from the file formats (the safetensors header, zip local file headers),
not by the code under test.
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from sdcompile.weights import single_file
from sdcompile.weights.loading import load_models
from sdcompile.weights.safetensors_extent import check_safetensors_extent
from sdcompile.weights.unpickler import read_pickled
from sdrun.errors import USAGE_EXIT_CODE, UserError
from tests.fixtures.released_layout import released_state_dict, write_ckpt, write_safetensors

SEED = 5
# A text-encoder tensor, so that exporting only the text encoder still has to refuse the file.
CUT_KEY = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
ZIP_LOCAL_HEADER_BYTES = 30  # fixed part of a zip local file header (APPNOTE 4.3.7)


@pytest.fixture(scope="module")
def released_state(tiny_recipe) -> dict[str, torch.Tensor]:
    return released_state_dict(tiny_recipe, SEED)


@pytest.fixture
def released_safetensors(tmp_path, released_state) -> Path:
    return write_safetensors(released_state, tmp_path / "tiny.safetensors")


@pytest.fixture
def released_ckpt(tmp_path, released_state) -> Path:
    return write_ckpt(released_state, tmp_path / "tiny.ckpt")


def safetensors_byte_range(path: Path, name: str) -> tuple[int, int]:
    """[begin, end) of tensor `name` in the file: data offsets shifted past the 8 + N header bytes."""
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8: 8 + header_length])[name]["data_offsets"]
    return 8 + header_length + begin, 8 + header_length + end


def zip_record_byte_range(path: Path, record_name: str) -> tuple[int, int]:
    """[begin, end) of a stored zip record's data: after its local header's name and extra field."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(record_name)
    with open(path, "rb") as file:
        file.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
    begin = info.header_offset + ZIP_LOCAL_HEADER_BYTES + name_length + extra_length
    return begin, begin + info.compress_size


def record_holding(path: Path, tensor: torch.Tensor) -> str:
    """The one data record of a torch.save archive whose bytes are `tensor`'s (random weights: unique)."""
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist() if "/data/" in info.filename
                 and info.file_size == len(data) and archive.read(info) == data]
    assert len(names) == 1, names
    return names[0]


def cut_at(path: Path, size: int) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def cut_inside_tensor(path: Path, key: str) -> tuple[int, int]:
    begin, end = safetensors_byte_range(path, key)
    cut_at(path, (begin + end) // 2)
    return begin, end


def run_export(checkpoint: Path, out: Path) -> int:
    from sdcompile.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--recipe", "tiny", "--checkpoint", str(checkpoint), "--out", str(out),
              "--component", "text_encoder"])
    return exit_.value.code


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail if safetensors loads tensor data: a cut file must be refused from its header."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(single_file.safetensors.torch, "load_file", refuse)


# --- .safetensors ----------------------------------------------------------------------------------------


def test_complete_released_file_passes_the_extent_check(released_safetensors, tiny_recipe):
    check_safetensors_extent(released_safetensors)
    load_models(tiny_recipe, released_safetensors)


def test_safetensors_cut_inside_a_tensor_names_it(released_safetensors, tiny_recipe, no_tensor_reads):
    begin, end = cut_inside_tensor(released_safetensors, CUT_KEY)
    size = released_safetensors.stat().st_size
    with pytest.raises(UserError, match="is truncated") as info:
        load_models(tiny_recipe, released_safetensors)
    assert f"ends inside tensor '{CUT_KEY}'" in info.value.problem
    assert f"at bytes [{begin}, {end})" in info.value.expected
    assert info.value.got == f"a file of {size} bytes"
    assert "sha256" in info.value.fix


def test_safetensors_cut_between_tensors_names_the_first_missing(released_safetensors, tiny_recipe):
    begin, _ = safetensors_byte_range(released_safetensors, CUT_KEY)
    cut_at(released_safetensors, begin)
    with pytest.raises(UserError, match=f"ends before tensor '{CUT_KEY}'"):
        load_models(tiny_recipe, released_safetensors)


@pytest.mark.parametrize("keep, message", [(5, "does not start with a header length"),
                                           (40, "its header runs past the end of the file")])
def test_safetensors_cut_inside_the_header(released_safetensors, keep, message):
    cut_at(released_safetensors, keep)
    with pytest.raises(UserError, match=message) as info:
        check_safetensors_extent(released_safetensors)
    assert f"{keep} bytes" in info.value.got


def test_offsets_that_disagree_with_dtype_and_shape_are_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}).encode()
    path = tmp_path / "inconsistent.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(20))
    with pytest.raises(UserError, match="tensor 'w' does not span its size") as info:
        check_safetensors_extent(path)
    assert info.value.expected.startswith("24 bytes") and "[0, 20)" in info.value.got


def test_a_cut_shard_in_a_diffusers_folder_is_refused_before_any_is_read(tmp_path, tiny_recipe, released_state,
                                                                          no_tensor_reads):
    for name in ("unet", "vae"):
        (tmp_path / name).mkdir()
        write_safetensors({"x": torch.zeros(4)}, tmp_path / name / "diffusion_pytorch_model.safetensors")
    (tmp_path / "text_encoder").mkdir()
    text = {k: v for k, v in released_state.items() if k.startswith("cond_stage_model.")}
    shard = write_safetensors(text, tmp_path / "text_encoder" / "model.safetensors")
    cut_inside_tensor(shard, CUT_KEY)
    with pytest.raises(UserError, match=f"ends inside tensor '{CUT_KEY}'"):
        load_models(tiny_recipe, tmp_path)


# --- .ckpt (torch.save zip archives) ---------------------------------------------------------------------


def test_ckpt_cut_inside_a_tensor_record_is_truncated(released_ckpt, released_state, tiny_recipe):
    record = record_holding(released_ckpt, released_state[CUT_KEY])
    begin, end = zip_record_byte_range(released_ckpt, record)
    cut_at(released_ckpt, (begin + end) // 2)
    with pytest.raises(UserError, match="is truncated or not a zip checkpoint") as info:
        load_models(tiny_recipe, released_ckpt)
    assert str(released_ckpt) in info.value.problem
    assert f"{(begin + end) // 2} bytes" in info.value.got and "sha256" in info.value.fix


def test_a_short_storage_record_names_the_tensor_it_backs(released_ckpt, released_state):
    record = record_holding(released_ckpt, released_state[CUT_KEY])
    with zipfile.ZipFile(released_ckpt) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(released_ckpt, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data[: len(data) // 2] if name == record else data)
    with pytest.raises(UserError, match=f"the data of tensor '{CUT_KEY}' is incomplete") as info:
        read_pickled(released_ckpt)
    assert record in info.value.expected and "sha256" in info.value.fix


# --- through the CLI -------------------------------------------------------------------------------------


def test_cli_refuses_a_cut_safetensors_with_exit_2_and_writes_nothing(released_safetensors, tmp_path, capsys):
    cut_inside_tensor(released_safetensors, CUT_KEY)
    out = tmp_path / "bundle"
    assert run_export(released_safetensors, out) == USAGE_EXIT_CODE
    stderr = capsys.readouterr().err
    assert f"ends inside tensor '{CUT_KEY}'" in stderr and "internal error" not in stderr
    assert not out.exists()


def test_cli_refuses_a_cut_ckpt_with_exit_2_and_writes_nothing(released_ckpt, tmp_path, capsys):
    cut_at(released_ckpt, released_ckpt.stat().st_size // 2)
    out = tmp_path / "bundle"
    assert run_export(released_ckpt, out) == USAGE_EXIT_CODE
    stderr = capsys.readouterr().err
    assert "truncated or not a zip checkpoint" in stderr and str(released_ckpt) in stderr
    assert not out.exists()
