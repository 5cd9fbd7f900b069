"""Accuracy gates: a threshold on one statistic of (reference, candidate) for one precision.

Every check that accepts or refuses numbers takes its gate from here: export verification (each
graph on ONNX Runtime CPU against eager PyTorch), the benchmark (every backend against eager fp32)
and the GPU check (TensorRT against ONNX Runtime CPU). A failing verdict names the threshold it
would have needed.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import numpy as np

from sdrun.metrics import compare

IMAGE_OUTPUTS = frozenset({"images"})  # decoded images in [-1, 1]
DECODED_RANGE = 2.0  # peak-to-peak of decoded images, for PSNR
UNIT_RANGE = 1.0  # uint8 images scaled to [0, 1]


class Statistic(enum.Enum):
    """A `sdrun.metrics.Comparison` field; errors must stay below their gate, similarities above."""

    MAX_ABS = "max_abs"
    REL_L2 = "rel_l2"
    COSINE = "cosine"
    PSNR_DB = "psnr_db"

    @property
    def relation(self) -> str:
        return ">=" if self in (Statistic.COSINE, Statistic.PSNR_DB) else "<="


@dataclasses.dataclass(frozen=True)
class Gate:
    statistic: Statistic
    threshold: float
    precision: str  # "fp32" | "fp16": the candidate's precision the gate is set for

    def passes(self, value: float) -> bool:
        return value >= self.threshold if self.statistic.relation == ">=" else value <= self.threshold

    def judge(self, subject: str, statistics: Mapping[str, float]) -> Verdict:
        return Verdict(subject, self, float(statistics[self.statistic.value]), dict(statistics))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One gate applied to one comparison."""

    subject: str  # what was compared, e.g. "unet_step: latent" or "onnxruntime fp16 step-fused image"
    gate: Gate
    value: float
    statistics: dict  # every Comparison field of the pair

    @property
    def passed(self) -> bool:
        return self.gate.passes(self.value)

    @property
    def relation(self) -> str:
        return self.gate.statistic.relation

    def describe(self) -> str:
        relation = self.relation
        verdict = "ok" if self.passed else f"FAILED: it would have needed {relation} {self.value:.4g}"
        return (f"{self.subject}: {self.gate.statistic.value} = {self.value:.6g} "
                f"(gate {relation} {self.gate.threshold:g}) {verdict}")

    def to_dict(self) -> dict:
        return {"subject": self.subject, "statistic": self.gate.statistic.value, "relation": self.gate.statistic.relation,
                "threshold": self.gate.threshold, "precision": self.gate.precision, "value": self.value,
                "passed": self.passed, "metrics": self.statistics}


# --- the gates ------------------------------------------------------------------------------------------

# One graph output against eager PyTorch on the same inputs (export verification; the benchmark's
# per-component accuracy). fp32 graphs differ only in summation order.
FP32_OUTPUT = Gate(Statistic.REL_L2, 1e-5, "fp32")
# Decoded fp32 images: a deep conv stack at 512² accumulates reordering error past 1e-5 relative L2
# (SD 1.5 VAE: 1.6e-5), so they are gated on what survives quantisation: every pixel within 1e-3 in
# [-1, 1] units, an eighth of one 8-bit level.
FP32_IMAGE_OUTPUT = Gate(Statistic.MAX_ABS, 1e-3, "fp32")
# fp16 embeddings and noise predictions keep their direction: 0.999 is ~2.6° between them.
FP16_OUTPUT = Gate(Statistic.COSINE, 0.999, "fp16")
# One fp16 VAE decode over [-1, 1].
FP16_IMAGE_OUTPUT = Gate(Statistic.PSNR_DB, 35.0, "fp16")

# A whole txt2img run's uint8 image over [0, 1] against eager fp32 with the same noise. fp32: a pixel may
# round to the neighbouring level on either side, never further. fp16: 30 dB is an RMS error of 3.2% of
# the range; the latents drift over the steps, and the image must read the same at a glance.
FP32_PIPELINE_IMAGE = Gate(Statistic.MAX_ABS, 2 / 255, "fp32")
FP16_PIPELINE_IMAGE = Gate(Statistic.PSNR_DB, 30.0, "fp16")

# diffusers' pipeline against ours on the same weights and noise: the same float32 math in another op
# order; float images in [-1, 1] agree to well under one uint8 step.
PEER_IMAGE = Gate(Statistic.MAX_ABS, 1e-3, "fp32")

# TensorRT against ONNX Runtime CPU, per output. fp32 engines built without TF32 (the default) face the
# ONNX Runtime fp32 gates (`output_gate`). With `--tf32`, every fp32 matrix product and convolution rounds
# its inputs to 11 significant bits (unit roundoff 2⁻¹¹ ≈ 4.9e-4, so ~1e-3 relative per product with fp32
# accumulation); over the tens of such layers of a UNet the errors add in quadrature to a few 1e-3: 1e-2
# relative L2 leaves room for that and no more. fp16 engines: kernels of another accumulation order than
# ONNX Runtime's over fp16 activations.
TENSORRT_TF32_OUTPUT = Gate(Statistic.REL_L2, 1e-2, "fp32")
TENSORRT_FP16_OUTPUT = Gate(Statistic.REL_L2, 3e-2, "fp16")


def output_gate(output: str, precision: str) -> Gate:
    """The gate of one graph output at `precision` against eager PyTorch."""
    image = output in IMAGE_OUTPUTS
    if precision == "fp32":
        return FP32_IMAGE_OUTPUT if image else FP32_OUTPUT
    return FP16_IMAGE_OUTPUT if image else FP16_OUTPUT


def pipeline_image_gate(precision: str) -> Gate:
    return FP32_PIPELINE_IMAGE if precision == "fp32" else FP16_PIPELINE_IMAGE


def tensorrt_gate(output: str, precision: str, tf32: bool) -> Gate:
    """The gate of one TensorRT engine output against ONNX Runtime CPU; `tf32`: the engine was built
    with TF32 (`EngineRecord.tf32`)."""
    if precision != "fp32":
        return TENSORRT_FP16_OUTPUT
    return TENSORRT_TF32_OUTPUT if tf32 else output_gate(output, precision)


def output_statistics(output: str, reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Comparison fields of one graph output; decoded images over their [-1, 1] range."""
    data_range = DECODED_RANGE if output in IMAGE_OUTPUTS else None
    return compare(reference, candidate.astype(np.float32), data_range).to_dict()


def check_output(subject: str, output: str, reference: np.ndarray, candidate: np.ndarray,
                 precision: str) -> Verdict:
    """One graph output against its reference under `output_gate`."""
    return output_gate(output, precision).judge(subject, output_statistics(output, reference, candidate))
