"""Facts both packages need are stated once, in `sdrun`, and the compiler's view is the runtime's."""
from __future__ import annotations

import sdcompile.recipes
import sdcompile.trt_profiles
from sdrun import engine_files, gates, recipe
from sdrun.samplers import discretize
from sdrun.bundle import read_manifest


def test_the_compiler_uses_the_runtimes_types_and_constants():
    assert sdcompile.recipes.Recipe is recipe.Recipe
    assert sdcompile.recipes.Parameterization is recipe.Parameterization is discretize.Parameterization
    assert sdcompile.recipes.DDPMSchedule is recipe.DDPMSchedule
    assert sdcompile.trt_profiles.LEVELS is engine_files.LEVELS


def test_a_bundles_recipe_reads_back_as_the_recipe_it_was_exported_from(tiny_bundle, tiny_recipe):
    manifest = read_manifest(tiny_bundle)
    assert manifest.recipe == tiny_recipe
    assert (manifest.recipe.vae_scale, manifest.recipe.size_multiple) == (8, 16)


def test_export_records_the_runtimes_gates(tiny_bundle):
    for name, record in read_manifest(tiny_bundle).components.items():
        for verdict in record.report["verification"]:
            gate = gates.output_gate(verdict["subject"], record.precision)
            assert (verdict["statistic"], verdict["threshold"]) == (gate.statistic.value, gate.threshold), name
