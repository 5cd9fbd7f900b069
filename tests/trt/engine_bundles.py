"""A copy of a bundle with TensorRT engines built, for the gpu-marked tests; skipped with the reason
where TensorRT or a GPU is absent."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def engine_bundle(source: Path, folder: Path, components: tuple[str, ...] = ("all",), shapes=None,
                  refittable: bool = False) -> Path:
    """`source` copied into `folder/bundle` with engines for `components` (profile `shapes`, or the recipe's)."""
    from sdrun.backends.tensorrt import tensorrt_available

    available, reason = tensorrt_available()
    if not available:
        pytest.skip(reason)
    from sdcompile.trt import BuildOptions, BuildRequest, build_engines
    from sdcompile.trt_profiles import ShapeRequest

    copy = folder / "bundle"
    shutil.copytree(source, copy)
    options = BuildOptions(shapes=shapes or ShapeRequest(), refittable=refittable)
    build_engines(BuildRequest(copy, components, options), log=lambda line: None)
    return copy
