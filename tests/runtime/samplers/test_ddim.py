"""DDIM schedule and update: golden numbers, closed forms, parity with diffusers' DDIMScheduler."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sdrun.errors import UserError
from sdrun.recipe import DDPMSchedule, Parameterization
from sdrun.samplers.ddim import (ddim_step, ddim_step_coefficients, ddim_table, ddim_timesteps,
                                 predict_eps_and_x0)
from sdrun.samplers.discretize import alphas_cumprod
from sdrun.sampling import classifier_free_guidance
from tests.runtime.samplers.ldm_img2img import img2img_start, img2img_table, q_sample_ddim

SD_SCHEDULE = DDPMSchedule(linear_start=0.00085, linear_end=0.012, timesteps=1000)
# Relative tolerance of the final sample against diffusers: its betas are float32, ours float64.
DIFFUSERS_RTOL = 1e-5
SHAPE = (2, 4, 8, 8)


def dummy_model(x: np.ndarray, t: int) -> np.ndarray:
    """A deterministic stand-in for the UNet."""
    return 0.1 * x + np.sin(t)


def run_ddim(table, x, noises, parameterization):
    for i in range(len(table)):
        output = dummy_model(x, int(table.timesteps[i]))
        x = ddim_step(x, output, table.a_t[i], table.a_prev[i], table.sigma[i], noises[i],
                      parameterization)
    return x


def test_alphas_cumprod_golden_values():
    alphas = alphas_cumprod(SD_SCHEDULE)
    assert alphas.dtype == np.float64 and alphas.shape == (1000,)
    np.testing.assert_allclose(alphas[[0, 1, 500, 741, 999]],
                               [0.99915, 0.9982960278384514, 0.2763326838229746,
                                0.06035557206788934, 0.00466009851307724], rtol=1e-12)


def test_ddim_timesteps_uniform_discretization():
    np.testing.assert_array_equal(ddim_timesteps(50, 1000), np.arange(1, 1000, 20))
    np.testing.assert_array_equal(ddim_timesteps(10, 1000), [1, 101, 201, 301, 401, 501, 601,
                                                              701, 801, 901])
    # ldm keeps every c-th timestep, c = T // S: S=30 gives 31 steps, the last at 991.
    steps = ddim_timesteps(30, 1000)
    assert len(steps) == 31 and steps[-1] == 991
    # S = 1000 would end at t = 1000, past the table (ldm fails there); that step is dropped.
    assert len(ddim_timesteps(1000, 1000)) == 999 and len(ddim_timesteps(1, 1000)) == 1


@pytest.mark.parametrize("num_steps", [0, -3, 1001, 2.5])
def test_invalid_step_count_is_a_user_error(num_steps):
    with pytest.raises(UserError) as error:
        ddim_table(SD_SCHEDULE, num_steps, eta=0.0)
    assert error.value.expected and error.value.got and error.value.fix


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_invalid_eta_is_a_user_error(eta):
    with pytest.raises(UserError):
        ddim_table(SD_SCHEDULE, 50, eta=eta)


def test_ddim_table_layout_and_sigma_golden_value():
    table = ddim_table(SD_SCHEDULE, 50, eta=1.0)
    alphas = alphas_cumprod(SD_SCHEDULE)
    assert len(table) == 50 and table.timesteps[0] == 981 and table.timesteps[-1] == 1
    np.testing.assert_array_equal(table.a_t, alphas[table.timesteps])
    np.testing.assert_array_equal(table.a_prev[:-1], table.a_t[1:])
    assert table.a_prev[-1] == alphas[0]  # ldm: ᾱ_0, not 1, after the last step
    np.testing.assert_allclose(table.sigma[[0, 25, 49]],
                               [0.45446327241359896, 0.2876852737143147, 0.02064832016530211],
                               rtol=1e-12)
    a_t, a_prev = alphas[981], alphas[961]
    assert table.sigma[0] == pytest.approx(np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))
    assert not ddim_table(SD_SCHEDULE, 50, eta=0.0).sigma.any()
    with pytest.raises(ValueError):
        table.a_t[0] = 0.5


def test_classifier_free_guidance():
    uncond, cond = np.full(3, 1.0), np.full(3, 3.0)
    np.testing.assert_array_equal(classifier_free_guidance(uncond, cond, 7.5), np.full(3, 16.0))
    np.testing.assert_array_equal(classifier_free_guidance(uncond, cond, 1.0), cond)
    np.testing.assert_array_equal(classifier_free_guidance(uncond, cond, 0.0), uncond)


@pytest.mark.parametrize("parameterization", list(Parameterization))
def test_v_and_eps_conversions_are_consistent(parameterization):
    rng = np.random.default_rng(0)
    x0, eps, a_t = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE), 0.3
    x_t = np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * eps
    v = np.sqrt(a_t) * eps - np.sqrt(1 - a_t) * x0
    output = v if parameterization is Parameterization.V else eps
    eps_hat, x0_hat = predict_eps_and_x0(x_t, output, a_t, parameterization)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-12)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-12)


@pytest.mark.parametrize("parameterization", list(Parameterization))
def test_deterministic_ddim_with_exact_model_stays_on_the_trajectory(parameterization):
    """η=0 and the true ε (or v) of a fixed (x_0, ε) keep x_t = sqrt(ᾱ_t)x_0 + sqrt(1-ᾱ_t)ε."""
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    table = ddim_table(SD_SCHEDULE, 20, eta=0.0)
    x = np.sqrt(table.a_t[0]) * x0 + np.sqrt(1 - table.a_t[0]) * eps
    for a_t, a_prev in zip(table.a_t, table.a_prev):
        v = np.sqrt(a_t) * eps - np.sqrt(1 - a_t) * x0
        output = v if parameterization is Parameterization.V else eps
        x = ddim_step(x, output, a_t, a_prev, 0.0, None, parameterization)
    a_last = table.a_prev[-1]
    np.testing.assert_allclose(x, np.sqrt(a_last) * x0 + np.sqrt(1 - a_last) * eps, atol=1e-10)


@pytest.mark.parametrize("parameterization", list(Parameterization))
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_linear_coefficients_equal_the_step(parameterization, eta):
    rng = np.random.default_rng(2)
    table = ddim_table(SD_SCHEDULE, 25, eta=eta)
    c_x, c_out = ddim_step_coefficients(table.a_t, table.a_prev, table.sigma, parameterization)
    assert c_x.shape == c_out.shape == (25,)
    for i in range(len(table)):
        x, output, noise = (rng.standard_normal(SHAPE) for _ in range(3))
        stepped = ddim_step(x, output, table.a_t[i], table.a_prev[i], table.sigma[i], noise,
                            parameterization)
        linear = c_x[i] * x + c_out[i] * output + table.sigma[i] * noise
        np.testing.assert_allclose(linear, stepped, rtol=1e-10, atol=1e-12)


def test_step_keeps_float32():
    x = np.ones(SHAPE, dtype=np.float32)
    table = ddim_table(SD_SCHEDULE, 10, eta=0.5)
    out = ddim_step(x, x, table.a_t[0], table.a_prev[0], table.sigma[0], x, Parameterization.EPS)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x, x, table.a_t[0], table.a_prev[0], table.sigma[0], None, Parameterization.EPS)


@pytest.mark.parametrize("num_steps", [10, 20, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("parameterization", list(Parameterization))
def test_matches_diffusers_ddim_scheduler(num_steps, eta, parameterization):
    import diffusers
    import torch
    reference = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
        timestep_spacing="leading",
        prediction_type="v_prediction" if parameterization is Parameterization.V else "epsilon")
    reference.set_timesteps(num_steps)
    table = ddim_table(SD_SCHEDULE, num_steps, eta=eta)
    np.testing.assert_array_equal(reference.timesteps.numpy(), table.timesteps)

    rng = np.random.default_rng(3)
    x_start = rng.standard_normal(SHAPE)
    noises = rng.standard_normal((num_steps, *SHAPE))
    ours = run_ddim(table, x_start, noises, parameterization)

    sample = torch.from_numpy(x_start)
    for i, t in enumerate(reference.timesteps):
        output = torch.from_numpy(dummy_model(sample.numpy(), int(t)))
        sample = reference.step(output, t, sample, eta=eta,
                                variance_noise=torch.from_numpy(noises[i])).prev_sample
    expected = sample.numpy()
    np.testing.assert_allclose(ours, expected, rtol=DIFFUSERS_RTOL,
                               atol=DIFFUSERS_RTOL * np.abs(expected).max())


def test_img2img_truncated_schedule_follows_ldm():
    table = ddim_table(SD_SCHEDULE, 50, eta=0.0)
    t_enc = img2img_start(50, 0.75)
    assert t_enc == 37
    alphas = alphas_cumprod(SD_SCHEDULE)
    x0, noise = np.full(SHAPE, 0.5), np.full(SHAPE, -1.0)
    # ldm stochastic_encode: noised to ddim_timesteps[37] = 741 ...
    np.testing.assert_allclose(q_sample_ddim(x0, noise, table, t_enc),
                               np.sqrt(alphas[741]) * x0 + np.sqrt(1 - alphas[741]) * noise)
    # ... while decode runs ddim_timesteps[:37] reversed: 721, 701, ..., 1.
    steps = img2img_table(table, t_enc)
    assert len(steps) == 37
    np.testing.assert_array_equal(steps.timesteps, np.arange(721, 0, -20))
    np.testing.assert_array_equal(steps.a_prev, table.a_prev[-37:])


def test_img2img_full_strength_noises_to_the_noisiest_step_and_runs_all_steps():
    table = ddim_table(SD_SCHEDULE, 50, eta=0.0)
    t_enc = img2img_start(50, 1.0)
    assert t_enc == 50
    x0, noise = np.zeros(SHAPE), np.ones(SHAPE)
    np.testing.assert_allclose(q_sample_ddim(x0, noise, table, t_enc), np.sqrt(1 - table.a_t[0]))
    steps = img2img_table(table, t_enc)
    np.testing.assert_array_equal(steps.timesteps, table.timesteps)


def test_img2img_uneven_steps_follow_ldm_indexing():
    table = ddim_table(SD_SCHEDULE, 30, eta=0.0)  # 31 timesteps: 1, 34, ..., 991
    t_enc = img2img_start(30, 1.0)
    x0, noise = np.zeros(SHAPE), np.ones(SHAPE)
    alphas = alphas_cumprod(SD_SCHEDULE)
    np.testing.assert_allclose(q_sample_ddim(x0, noise, table, t_enc), np.sqrt(1 - alphas[991]))
    assert img2img_table(table, t_enc).timesteps[0] == 958


def test_img2img_small_strength_runs_no_step():
    table = ddim_table(SD_SCHEDULE, 50, eta=0.0)
    t_enc = img2img_start(50, 0.01)
    assert t_enc == 0 and len(img2img_table(table, t_enc)) == 0


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.01, float("nan")])
def test_invalid_strength_is_a_user_error(strength):
    with pytest.raises(UserError) as error:
        img2img_start(50, strength)
    assert error.value.expected and error.value.got and error.value.fix


def test_invalid_img2img_step_count_is_a_user_error():
    with pytest.raises(UserError):
        img2img_start(0, 0.5)


def test_t_enc_outside_the_table_is_rejected():
    table = ddim_table(SD_SCHEDULE, 10, eta=0.0)
    with pytest.raises(ValueError):
        img2img_table(table, 11)
    with pytest.raises(ValueError):
        q_sample_ddim(np.zeros(SHAPE), np.zeros(SHAPE), table, -1)


def test_module_imports_neither_torch_nor_sdcompile():
    code = ("import sys, sdrun.samplers; "
            "assert not {'torch', 'sdcompile'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("steps", [3, 9, 27, 37, 111, 333])
def test_timesteps_never_reach_T_when_the_stride_divides_T_minus_1(steps):
    timesteps = ddim_timesteps(steps, 1000)
    assert timesteps.max() < 1000 and len(timesteps) == steps
