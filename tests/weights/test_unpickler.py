"""The restricted unpickler, the security boundary of checkpoint reading: allowed, inert and
refused globals, Python 2 names, storage records, and proof that nothing runs or is imported."""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from weight_checks import assert_same_weights

from sdcompile.weights.loading import load_models
from sdcompile.weights.unpickler import InertStandIn, RefusedGlobal, python3_name, read_pickled, resolve_global
from sdcompile.weights.writing import ldm_state_dict
from sdrun.errors import UserError

# Pickle opcodes (Lib/pickletools.py) for hand-made archives.
PROTO_2, PROTO_4 = b"\x80\x02", b"\x80\x04"
MARK, TUPLE, REDUCE, STOP = b"(", b"t", b"R", b"."
EMPTY_TUPLE, EMPTY_DICT, EMPTY_LIST, NEWOBJ, BUILD = b")", b"}", b"]", b"\x81", b"b"
SETITEM, APPEND, STACK_GLOBAL = b"s", b"a", b"\x93"


def pickled_text(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def pickled_int(value: int) -> bytes:
    return b"K" + bytes([value])  # BININT1


def global_opcode(module: str, name: str, stack: bool = False) -> bytes:
    """GLOBAL `module name` (protocols 0-3), or STACK_GLOBAL from two strings (protocol 4)."""
    if stack:
        return pickled_text(module) + pickled_text(name) + STACK_GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def call_pickle(module: str, name: str, argument: str, stack: bool = False) -> bytes:
    """A pickle whose loading calls `module.name(argument)`."""
    proto = PROTO_4 if stack else PROTO_2
    return proto + global_opcode(module, name, stack) + MARK + pickled_text(argument) + TUPLE + REDUCE + STOP


def torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A zip archive laid out as torch.save writes one, holding `data_pkl` and no storages."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


def with_storage_records_cut(path: Path, keep: int) -> None:
    """Rewrite a torch.save archive with every storage record cut to its first `keep` bytes."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data[:keep] if "/data/" in name else data)


def lightning_stand_ins(monkeypatch) -> dict[str, type]:
    """Classes whose pickled names are those of training-library objects (the libraries need not exist)."""
    classes = {}
    for module_name, class_name, base in [
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint", object),
        ("pytorch_lightning.utilities.parsing", "AttributeDict", dict),
        ("omegaconf.dictconfig", "DictConfig", object),
    ]:
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        cls = type(class_name, (base,), {"__module__": module_name, "__qualname__": class_name})
        setattr(sys.modules[module_name], class_name, cls)
        classes[class_name] = cls
    return classes


def test_lightning_checkpoint_with_training_records_loads(tmp_path, monkeypatch, tiny_recipe, tiny_state):
    import numpy as np

    cls = lightning_stand_ins(monkeypatch)
    hparams = cls["AttributeDict"](lr=1e-4, name="run")
    config = cls["DictConfig"]()
    config.content = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion"}}
    path = tmp_path / "lightning.ckpt"
    torch.save({
        "state_dict": tiny_state,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {cls["ModelCheckpoint"]: {"best_model_score": torch.tensor(0.5), "dirpath": "logs/ckpts"}},
        "hyper_parameters": hparams,
        "config": config,
        "best_loss": np.float64(0.123),
        "lr_schedulers": [{"_last_lr": [1e-4]}],
    }, path)
    monkeypatch.undo()  # loading must not need the training libraries
    loaded = load_models(tiny_recipe, path)
    assert_same_weights(tiny_state, ldm_state_dict(loaded))


class _WritesMarker:
    def __init__(self, how: str, marker: str):
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "builtins.exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        return subprocess.Popen, (["touch", self.marker],)


@pytest.mark.parametrize("how, refused_name", [
    ("os.system", os.system.__module__ + ".system"),
    ("builtins.exec", "builtins.exec"),
    ("subprocess.Popen", "subprocess.Popen"),
])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, tiny_recipe, tiny_state, how,
                                                              refused_name):
    marker = tmp_path / "marker"
    path = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": tiny_state | {"payload": _WritesMarker(how, str(marker))}}, path)
    assert not marker.exists()
    with pytest.raises(UserError) as info:
        load_models(tiny_recipe, path)
    assert refused_name in str(info.value) and "safetensors" in info.value.fix
    assert not marker.exists(), "the checkpoint ran code"


def test_global_resolution_allows_tensors_and_stands_in_for_training_records():
    assert resolve_global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint") is InertStandIn
    assert resolve_global("numpy.core.multiarray", "scalar") is InertStandIn
    assert resolve_global("torch", "float16") is torch.float16
    for module, name in [("torch", "load"), ("torch.hub", "load"), ("builtins", "getattr"), ("posix", "system"),
                         ("__main__", "Anything"), ("torch", "_dynamo")]:
        with pytest.raises(RefusedGlobal):
            resolve_global(module, name)


# --- user errors -----------------------------------------------------------------------------------------


REFUSED = [
    ("os", "system", "touch {marker}", "os.system"),
    ("posix", "system", "touch {marker}", "posix.system"),
    ("builtins", "eval", "open({marker!r}, 'w').close()", "builtins.eval"),
    ("__builtin__", "eval", "open({marker!r}, 'w').close()", "builtins.eval"),  # protocol-2 name
    ("subprocess", "Popen", "touch {marker}", "subprocess.Popen"),
    ("commands", "getoutput", "touch {marker}", "subprocess.getoutput"),  # Python 2's `commands`
]


@pytest.mark.parametrize("stack", [False, True], ids=["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize("module, name, argument, refused", REFUSED)
def test_a_global_outside_the_allow_list_is_refused_by_name(tmp_path, module, name, argument, refused, stack):
    marker = tmp_path / "marker"
    path = torch_zip(tmp_path / "hand-made.ckpt", call_pickle(module, name, argument.format(marker=str(marker)), stack))
    with pytest.raises(UserError) as info:
        read_pickled(path)
    assert f"`{refused}`" in info.value.problem and info.value.got == f"pickle global {refused}"
    assert "safetensors" in info.value.fix
    assert not marker.exists(), "the checkpoint ran code"


@pytest.mark.parametrize("module, name, argument", [("os", "system", "touch {marker}"),
                                                    ("__builtin__", "eval", "open({marker!r}, 'w').close()")])
def test_the_refused_payloads_do_run_under_a_plain_unpickler(tmp_path, module, name, argument):
    """The control for the test above: these hand-made pickles are real attacks."""
    marker = tmp_path / "marker"
    pickle.loads(call_pickle(module, name, argument.format(marker=str(marker))))
    assert marker.exists()


@pytest.mark.parametrize("module, name", [
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.utilities.parsing", "AttributeDict"),
    ("lightning_fabric.utilities", "AttributeDict"),
    ("omegaconf.dictconfig", "DictConfig"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("argparse", "Namespace"),
])
def test_training_library_globals_become_inert_stand_ins(tmp_path, module, name):
    cls = global_opcode(module, name)
    state = EMPTY_DICT + pickled_text("lr") + pickled_int(3) + SETITEM
    built = cls + EMPTY_TUPLE + NEWOBJ + state + BUILD  # cls.__new__(cls), then __setstate__(state)
    called = cls + MARK + pickled_text("f8") + TUPLE + REDUCE  # cls("f8")
    record = (PROTO_2 + EMPTY_DICT + pickled_text("built") + built + SETITEM
              + pickled_text("called") + called + SETITEM + STOP)
    loaded = read_pickled(torch_zip(tmp_path / "training.ckpt", record))
    assert set(loaded) == {"built", "called"}
    assert all(isinstance(value, InertStandIn) for value in loaded.values())


def test_nothing_named_by_the_file_is_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    for package in ("planted_payload_module", "omegaconf"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Config: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "omegaconf" not in sys.modules and "planted_payload_module" not in sys.modules
    build = EMPTY_TUPLE + NEWOBJ + STOP
    inert = read_pickled(torch_zip(tmp_path / "inert.ckpt", PROTO_2 + global_opcode("omegaconf", "Config") + build))
    assert isinstance(inert, InertStandIn)
    refused_pickle = PROTO_2 + global_opcode("planted_payload_module", "Config") + build
    with pytest.raises(UserError, match="planted_payload_module.Config"):
        read_pickled(torch_zip(tmp_path / "refused.ckpt", refused_pickle))
    assert not marker.exists()
    assert "omegaconf" not in sys.modules and "planted_payload_module" not in sys.modules
    try:  # the control: a plain unpickler imports the planted module
        pickle.loads(refused_pickle)
        assert marker.exists()
    finally:
        sys.modules.pop("planted_payload_module", None)


def test_protocol_2_python2_names_map_to_python3(tmp_path):
    assert python3_name("__builtin__", "set") == ("builtins", "set")
    assert python3_name("copy_reg", "_reconstructor") == ("copyreg", "_reconstructor")
    assert python3_name("torch._utils", "_rebuild_tensor_v2") == ("torch._utils", "_rebuild_tensor_v2")
    items = EMPTY_LIST + pickled_int(1) + APPEND + pickled_int(2) + APPEND
    record = PROTO_2 + global_opcode("__builtin__", "set") + MARK + items + TUPLE + REDUCE + STOP
    assert read_pickled(torch_zip(tmp_path / "py2.ckpt", record)) == {1, 2}


def test_bytes_written_by_protocol_2_are_rebuilt(tmp_path):
    path = tmp_path / "bytes.ckpt"
    torch.save({"note": b"\x00\xff latin-1", "shape": torch.Size([2, 3])}, path)
    assert read_pickled(path) == {"note": b"\x00\xff latin-1", "shape": torch.Size([2, 3])}


def test_a_storage_record_shorter_than_declared_is_rejected(tmp_path):
    path = tmp_path / "cut.ckpt"
    weights = torch.arange(8, dtype=torch.float32)
    torch.save({"w": weights}, path)
    assert torch.equal(read_pickled(path)["w"], weights)
    with_storage_records_cut(path, keep=16)  # 8 float32 are 32 bytes
    with pytest.raises(UserError, match="the data of tensor 'w' is incomplete") as info:
        read_pickled(path)
    assert info.value.expected == "32 bytes in record cut/data/0" and info.value.got == "16 bytes"


def test_a_legacy_torch_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "legacy.ckpt"
    path.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(UserError, match="not a torch zip archive") as info:
        read_pickled(path)
    assert "legacy" in info.value.got and "safetensors" in info.value.fix
