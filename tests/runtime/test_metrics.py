import numpy as np
import pytest

from sdrun.metrics import compare, cosine_similarity, max_abs_error, psnr, relative_l2, ssim


def test_identical_arrays():
    a = np.random.default_rng(0).normal(size=(2, 3, 8, 8))
    result = compare(a, a.copy())
    assert result.max_abs == 0 and result.rel_l2 == 0 and result.cosine == pytest.approx(1.0)
    assert result.psnr_db == float("inf")
    assert ssim(a, a) == pytest.approx(1.0)


def test_known_psnr():
    ref = np.zeros((4, 4))
    # MSE 0.01 over range 1 -> 20 dB
    assert psnr(ref, ref + 0.1, data_range=1.0) == pytest.approx(20.0)
    assert psnr(ref, ref + 0.01, data_range=1.0) == pytest.approx(40.0)


def test_cosine_of_orthogonal_and_opposite_vectors():
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine_similarity(np.array([1.0, 2.0]), np.array([-2.0, -4.0])) == pytest.approx(-1.0)


def test_relative_l2_and_max_abs():
    ref = np.array([3.0, 4.0])
    assert relative_l2(ref, np.array([3.0, 4.5])) == pytest.approx(0.1)
    assert max_abs_error(ref, np.array([2.0, 4.5])) == pytest.approx(1.0)


def test_ssim_drops_with_noise_and_is_symmetric():
    rng = np.random.default_rng(1)
    img = rng.uniform(size=(3, 32, 32))
    noisy = np.clip(img + rng.normal(scale=0.2, size=img.shape), 0, 1)
    assert ssim(img, noisy) < 0.9
    assert ssim(img, noisy) == pytest.approx(ssim(noisy, img))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        compare(np.zeros(3), np.zeros(4))
