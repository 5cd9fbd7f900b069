"""`sdcompile optimize`: run our graph passes on any SD-style ONNX file."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from sdcompile.options import AttentionTarget, Precision
from sdrun.errors import UserError


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    source: Path
    out: Path
    passes: tuple[str, ...] | None = None  # None: the default list for `precision`
    precision: Precision = Precision.FP32
    attention_target: AttentionTarget = AttentionTarget.ONNX


def optimize_file(config: OptimizeConfig) -> dict:
    """Optimize `config.source` into `config.out` (written atomically, with `<name>.data` beside it past
    protobuf's 2 GiB); the weights stay on disk throughout. Returns the pass reports."""
    from sdcompile.graph.external import save_graph
    from sdcompile.passes import default_passes, optimize_on_disk

    passes = list(config.passes) if config.passes else default_passes(config.precision)
    if config.precision is Precision.FP16 and "fp16" not in passes:
        passes.append("fp16")
    check_output_path(config.out)
    load_onnx(config.source, with_data=False)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.out.name}.", dir=config.out.parent))
    try:
        optimized, reports, source_dir = optimize_on_disk(config.source, passes, staging / "work",
                                                          attention_target=config.attention_target)
        for path in save_graph(optimized, staging / config.out.name, source_dir):
            os.replace(path, config.out.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"passes": passes, "reports": reports}


def load_onnx(path: Path, with_data: bool = True):
    """An ONNX model (with its external data unless not `with_data`), or a UserError saying what is wrong
    with the file."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist.", fix="pass the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=with_data)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as err:
        raise UserError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err}).",
                        expected="a complete ONNX protobuf (and its external data file beside it)",
                        fix="re-export the model, or check that the file was copied completely") from None
    if not model.graph.node:
        raise UserError(f"{path} holds no graph nodes; it is not an ONNX model or it is truncated.",
                        fix="re-export the model, or check that the file was copied completely")
    return model


def check_output_path(out: Path) -> None:
    parent = Path(out).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {parent} is not a writable directory.",
                        fix="create the directory or choose another output path")
