"""Tiny models with seeded random weights, shared by the weights tests."""
from __future__ import annotations

import pytest
import torch

from sdcompile.weights.loading import load_models
from sdcompile.weights.random_init import RandomWeights
from sdcompile.weights.writing import ldm_state_dict


@pytest.fixture(scope="module")
def tiny_models(tiny_recipe):
    return load_models(tiny_recipe, RandomWeights(7))


@pytest.fixture
def tiny_state(tiny_models) -> dict[str, torch.Tensor]:
    return ldm_state_dict(tiny_models)
