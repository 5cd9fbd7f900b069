"""Accuracy statistics between a reference array and a candidate (numpy only)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Comparison:
    max_abs: float
    mean_abs: float
    rel_l2: float  # ‖a − b‖₂ / ‖a‖₂
    cosine: float
    psnr_db: float  # over `data_range`

    def to_dict(self) -> dict:
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.max(np.abs(_f64(reference) - _f64(candidate)), initial=0.0))


def relative_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = _f64(reference)
    norm = np.linalg.norm(ref)
    diff = np.linalg.norm(ref - _f64(candidate))
    return float(diff / norm) if norm > 0 else float(diff)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _f64(a).ravel(), _f64(b).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / denom) if denom > 0 else float(np.array_equal(a, b))


def psnr(reference: np.ndarray, candidate: np.ndarray, data_range: float) -> float:
    """10·log10(range² / MSE) in dB; infinite for identical arrays."""
    mse = float(np.mean((_f64(reference) - _f64(candidate)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def compare(reference: np.ndarray, candidate: np.ndarray, data_range: float | None = None) -> Comparison:
    """All statistics; `None` data range means the reference's peak-to-peak."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    span = float(np.ptp(_f64(reference))) if data_range is None else data_range
    return Comparison(max_abs_error(reference, candidate),
                      float(np.mean(np.abs(_f64(reference) - _f64(candidate)))),
                      relative_l2(reference, candidate), cosine_similarity(reference, candidate),
                      psnr(reference, candidate, span or 1.0))


def ssim(reference: np.ndarray, candidate: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of (..., H, W) images (Wang et al. 2004, eq. 13; 11×11 Gaussian, σ=1.5)."""
    x, y = _f64(reference), _f64(candidate)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _gaussian_blur(x), _gaussian_blur(y)
    var_x = _gaussian_blur(x * x) - mu_x**2
    var_y = _gaussian_blur(y * y) - mu_y**2
    cov = _gaussian_blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def _gaussian_blur(image: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Separable 'valid' Gaussian filter over the last two axes."""
    size = min(size, image.shape[-1], image.shape[-2])
    taps = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
    taps /= taps.sum()
    rows = np.lib.stride_tricks.sliding_window_view(image, size, axis=-1) @ taps
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=-2) @ taps


def _f64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)
