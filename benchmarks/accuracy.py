"""Accuracy against the eager fp32 reference: the statistics the benchmark reports, judged by `sdrun.gates`.

Images are compared as the user sees them: uint8 scaled to [0, 1]; the peer's float images in [-1, 1]
before quantisation. A failing verdict says the threshold it would have needed.
"""
from __future__ import annotations

import numpy as np

from sdrun import gates
from sdrun.metrics import compare, ssim

IMAGE_COMPONENTS = {"vae_decoder": "images"}  # components whose output is a decoded image


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float64 in [0, 1]."""
    return images.astype(np.float64).transpose(0, 3, 1, 2) / 255.0


def image_statistics(reference: np.ndarray, candidate: np.ndarray, data_range: float = gates.UNIT_RANGE) -> dict:
    """Comparison fields plus mean SSIM over every (channel, image) of (B, 3, H, W) arrays."""
    stats = compare(reference, candidate, data_range).to_dict()
    stats["ssim"] = ssim(reference, candidate, data_range)
    return stats


def component_statistics(component: str, reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Comparison fields of one graph output; decoded images over their [-1, 1] range."""
    return gates.output_statistics(_output_of(component), reference, candidate)


def latent_statistics(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Comparison fields of final latents (PSNR over the reference's peak-to-peak range)."""
    return compare(reference, candidate).to_dict()


def component_gate(subject: str, component: str, precision: str, stats: dict) -> gates.Verdict:
    """The export verification's gate for this component's output, on the benchmark's inputs."""
    return gates.output_gate(_output_of(component), precision).judge(subject, stats)


def image_gate(subject: str, precision: str, stats: dict) -> gates.Verdict:
    return gates.pipeline_image_gate(precision).judge(subject, stats)


def peer_gate(subject: str, stats: dict) -> gates.Verdict:
    return gates.PEER_IMAGE.judge(subject, stats)


def _output_of(component: str) -> str:
    return IMAGE_COMPONENTS.get(component, component)
