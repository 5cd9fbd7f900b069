"""Shared test fixtures: recipes and tiny bundles exported once per session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_recipe():
    from sdcompile.recipes import load_recipe

    return load_recipe("tiny")


def _export(directory, precision, **options):
    from sdcompile.bundler import ExportConfig, export_bundle
    from sdcompile.options import Precision
    from sdcompile.recipes import load_recipe
    from sdcompile.weights import RandomWeights

    config = ExportConfig(recipe=load_recipe("tiny"), source=RandomWeights(0), out=directory,
                          precision=Precision(precision), **options)
    export_bundle(config, log=lambda line: None)
    return directory


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Every component of the tiny recipe, fp32, random weights seed 0."""
    return _export(tmp_path_factory.mktemp("bundles") / "tiny-fp32", "fp32")


@pytest.fixture(scope="session")
def tiny_bundle_fp16(tmp_path_factory):
    """Every component of the tiny recipe, fp16 with fp32 islands, random weights seed 0.

    Traced with explicit MatMul-Softmax-MatMul attention, so our fusion pass (not the exporter)
    produced every Attention node in it.
    """
    from sdcompile.options import AttentionImpl

    return _export(tmp_path_factory.mktemp("bundles") / "tiny-fp16", "fp16", attention=AttentionImpl.EXPLICIT)


@pytest.fixture(scope="session")
def released_twin(tmp_path_factory):
    """recipe name -> (file, bundle): a single file in the released checkpoint layout of the recipe's family,
    seeded random weights, exported through `sdcompile export` (every component), once per session."""
    from tests.family_twin import export_released_twin

    made = {}

    def twin(recipe_name: str):
        if recipe_name not in made:
            made[recipe_name] = export_released_twin(recipe_name, tmp_path_factory.mktemp(recipe_name))
        return made[recipe_name]

    return twin


@pytest.fixture(scope="session")
def shapes_bundle(tmp_path_factory):
    """precision -> the trained tiny-shapes bundle, exported from the committed weights through `sdcompile export`
    (every component), once per session and precision."""
    from benchmarks.shapes.bench import WEIGHTS
    from sdcompile.cli import main
    from tests.family_twin import cli

    made = {}

    def bundle(precision: str = "fp32"):
        if precision not in made:
            out = tmp_path_factory.mktemp(f"tiny-shapes-{precision}") / "bundle"
            cli(main, "export", "--recipe", "tiny-shapes", "--checkpoint", str(WEIGHTS), "--precision", precision,
                "--component", "all", "--out", str(out))
            made[precision] = out
        return made[precision]

    return bundle
