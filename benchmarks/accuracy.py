"""Accuracy against the eager fp32 reference: named gates, each with its statistic and why it is set there.

A gate compares one statistic of (reference, candidate) with its threshold; a failing gate says
the threshold it would have needed. Images are compared as the user sees them: uint8 scaled to
[0, 1]; the peer's float images in [-1, 1] before quantisation.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from sdrun.metrics import compare, ssim

# fp32 graphs differ from eager PyTorch only in summation order (~1e-6 relative per graph, the
# export gate allows 1e-5); after a whole denoising loop a pixel may round to the neighbouring uint8
# value on either side, never further.
FP32_IMAGE_MAX_ABS = 2 / 255
# 30 dB over [0, 1] is an RMS error of 3.2% of the range: fp16's 11-bit mantissa lets the latents
# drift over the steps, and the image must stay one that reads the same at a glance.
FP16_IMAGE_MIN_PSNR_DB = 30.0
# The same bar the export verification applies to every fp32 graph output on its sample inputs.
FP32_COMPONENT_MAX_REL_L2 = 1e-5
# Embeddings and noise predictions in fp16 keep their direction: 0.999 is ~2.6° between them.
FP16_COMPONENT_MIN_COSINE = 0.999
# One VAE decode in fp16 over [-1, 1]: the export verification's image gate.
FP16_DECODE_MIN_PSNR_DB = 35.0
# diffusers and our eager backend run the same float32 math in another op order; after 20 guided
# steps and a decode the float images agree to well under one uint8 step (1/127.5 in [-1, 1]).
PEER_IMAGE_MAX_ABS = 1e-3

IMAGE_RANGE = 1.0  # uint8 images scaled to [0, 1]
DECODED_RANGE = 2.0  # VAE output in [-1, 1]


class Relation(enum.Enum):
    AT_MOST = "<="
    AT_LEAST = ">="


@dataclasses.dataclass(frozen=True)
class Gate:
    subject: str  # what was compared, e.g. "onnxruntime fp16 step-fused: image"
    statistic: str  # a Comparison field: max_abs, rel_l2, cosine, psnr_db
    relation: Relation
    threshold: float
    value: float

    @property
    def passed(self) -> bool:
        if self.relation is Relation.AT_MOST:
            return self.value <= self.threshold
        return self.value >= self.threshold

    def describe(self) -> str:
        verdict = "ok" if self.passed else f"FAILED: it would have needed {self.relation.value} {self.value:.4g}"
        gate = f"gate {self.relation.value} {self.threshold:.4g}"
        return f"{self.subject}: {self.statistic} = {self.value:.4g} ({gate}) {verdict}"

    def to_dict(self) -> dict:
        return {"subject": self.subject, "statistic": self.statistic, "relation": self.relation.value,
                "threshold": self.threshold, "value": self.value, "passed": self.passed}


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float64 in [0, 1]."""
    return images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0


def image_statistics(reference: np.ndarray, candidate: np.ndarray, data_range: float = IMAGE_RANGE) -> dict:
    """Comparison fields plus mean SSIM over every (channel, image) of (B, 3, H, W) arrays."""
    stats = compare(reference, candidate, data_range).to_dict()
    stats["ssim"] = ssim(reference, candidate, data_range)
    return stats


def component_statistics(component: str, reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Comparison fields of one graph output; decoded images over their [-1, 1] range."""
    data_range = DECODED_RANGE if component == "vae_decoder" else None
    return compare(reference, candidate.astype(np.float32), data_range).to_dict()


def latent_statistics(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Comparison fields of final latents (PSNR over the reference's peak-to-peak range)."""
    return compare(reference, candidate).to_dict()


def component_gate(subject: str, component: str, precision: str, stats: dict) -> Gate:
    if precision == "fp32":
        return Gate(subject, "rel_l2", Relation.AT_MOST, FP32_COMPONENT_MAX_REL_L2, stats["rel_l2"])
    if component == "vae_decoder":
        return Gate(subject, "psnr_db", Relation.AT_LEAST, FP16_DECODE_MIN_PSNR_DB, stats["psnr_db"])
    return Gate(subject, "cosine", Relation.AT_LEAST, FP16_COMPONENT_MIN_COSINE, stats["cosine"])


def image_gate(subject: str, precision: str, stats: dict) -> Gate:
    if precision == "fp32":
        return Gate(subject, "max_abs", Relation.AT_MOST, FP32_IMAGE_MAX_ABS, stats["max_abs"])
    return Gate(subject, "psnr_db", Relation.AT_LEAST, FP16_IMAGE_MIN_PSNR_DB, stats["psnr_db"])


def peer_gate(subject: str, stats: dict) -> Gate:
    return Gate(subject, "max_abs", Relation.AT_MOST, PEER_IMAGE_MAX_ABS, stats["max_abs"])
