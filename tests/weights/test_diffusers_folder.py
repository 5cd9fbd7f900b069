"""Reading diffusers pipeline folders: what is refused, and why."""
from __future__ import annotations

import pytest

from sdcompile.weights.loading import load_models
from sdrun.errors import UserError


def test_directory_without_components(tmp_path, tiny_recipe):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="not a diffusers pipeline folder") as info:
        load_models(tiny_recipe, tmp_path)
    assert "vae/" in info.value.got and "text_encoder/" in info.value.got


def test_component_folder_without_weights(tmp_path, tiny_recipe):
    for name in ("unet", "vae", "text_encoder"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    with pytest.raises(UserError, match="holds no weights file"):
        load_models(tiny_recipe, tmp_path)
