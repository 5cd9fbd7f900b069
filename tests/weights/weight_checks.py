"""Helpers for the weights tests: weight comparison and a tiny recipe variant."""
from __future__ import annotations

import dataclasses
import re

import torch

from sdcompile.recipes import TextActivation, TextEncoderKind, TextOutputLayer, TokenizerPadding

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
COUNTS = re.compile(r"(\d+) missing, (\d+) unexpected and (\d+) mis-shaped keys")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def tiny_with_openclip(tiny):
    """The tiny recipe with an SD2-style OpenCLIP text encoder of another width."""
    text = dataclasses.replace(tiny.text_encoder, kind=TextEncoderKind.OPENCLIP, width=48, heads=3, layers=3,
                               activation=TextActivation.GELU, output_layer=TextOutputLayer.PENULTIMATE,
                               padding=TokenizerPadding.ZERO)
    unet = dataclasses.replace(tiny.unet, num_heads=-1, num_head_channels=16, use_linear_in_transformer=True,
                               context_dim=48)
    return dataclasses.replace(tiny, name="tiny-openclip", unet=unet, text_encoder=text)
