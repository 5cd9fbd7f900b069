"""Shared test fixtures: recipes and seeded tiny models."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_recipe():
    from sdcompile.recipes import load_recipe

    return load_recipe("tiny")
