"""Weight hashes see every tensor a real checkpoint carries: 0-dim scalars, fp16, bf16 and int64 included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcompile.fingerprint import state_dict_sha256, tensor_bytes, tensor_fingerprint

TENSORS = {
    "logit_scale (0-dim fp32)": torch.tensor(4.6052),
    "fp16 matrix": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).half(),
    "position_ids (int64)": torch.arange(77)[None],
    "0-dim int64 (num_updates)": torch.tensor(12345, dtype=torch.int64),
    "empty": torch.empty(0, 4),
}


@pytest.mark.parametrize("name", TENSORS)
def test_bytes_equal_numpys_for_every_rank_and_dtype(name):
    tensor = TENSORS[name]
    assert tensor_bytes(tensor) == np.ascontiguousarray(tensor.numpy()).tobytes()


def test_bf16_bytes_are_the_high_halves_of_the_fp32_bits():
    """bf16 has no numpy dtype; its bits are the top 16 of fp32 for values exact in bf16."""
    values = torch.tensor([1.0, -2.5, 0.15625, 3.0e5], dtype=torch.float32)
    high_halves = (values.numpy().view(np.uint32) >> 16).astype("<u2").tobytes()
    assert tensor_bytes(values.bfloat16()) == high_halves
    assert tensor_bytes(torch.tensor(1.0, dtype=torch.bfloat16)) == np.array([0x3F80], "<u2").tobytes()


def test_non_contiguous_views_hash_their_values():
    matrix = torch.arange(12.0).reshape(3, 4)
    assert tensor_fingerprint(matrix.t()) == tensor_fingerprint(matrix.t().contiguous())


def test_hash_changes_with_value_dtype_shape_and_name():
    base = {"logit_scale": torch.tensor(4.6052)}
    variants = [
        {"logit_scale": torch.tensor(4.6053)},
        {"logit_scale": torch.tensor(4.6052, dtype=torch.float64)},
        {"logit_scale": torch.tensor([4.6052])},
        {"logit_scale_": torch.tensor(4.6052)},
    ]
    hashes = {state_dict_sha256([("text_encoder", state)]) for state in [base, *variants]}
    assert len(hashes) == 1 + len(variants)
    assert state_dict_sha256([("text_encoder", base)]) == state_dict_sha256([("text_encoder", dict(base))])
