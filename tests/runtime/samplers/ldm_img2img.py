"""ldm's DDIM img2img (`stochastic_encode` and `decode` of ldm's DDIM sampler), written from its algorithm as the
reference the DDIM img2img plan is checked against: the runtime runs img2img only through plans."""
from __future__ import annotations

import numpy as np

from sdrun.errors import UserError
from sdrun.samplers.ddim import DDIMTable, _read_only


def img2img_start(num_steps: int, strength: float) -> int:
    """ldm's t_enc = int(strength · num_steps): how many DDIM steps img2img denoises."""
    if not (isinstance(num_steps, (int, np.integer)) and num_steps >= 1):
        raise UserError("Invalid number of sampling steps.", expected="an integer of at least 1",
                        got=repr(num_steps), fix="choose a step count such as 50")
    if not 0.0 < strength <= 1.0:
        raise UserError("Invalid img2img strength.",
                        expected="a number in (0, 1]: how much of the input image is re-noised",
                        got=repr(strength), fix="use e.g. 0.75 (SD1 default) or 0.8 (SD2 default)")
    return int(strength * num_steps)


def _noise_index(table: DDIMTable, t_enc: int) -> int:
    """Index (sampling order) of ldm's ascending `ddim_alphas[t_enc]`, clamped to the noisiest step.

    t_enc equals the table length only for strength 1.0 with S dividing T, where ldm indexes past
    its table; we noise to the noisiest DDIM timestep instead and then run every step, as
    diffusers' img2img does at strength 1.0.
    """
    if not 0 <= t_enc <= len(table):
        raise ValueError(f"t_enc must be in [0, {len(table)}], got {t_enc}")
    return max(len(table) - 1 - t_enc, 0)


def q_sample_ddim(x0: np.ndarray, noise: np.ndarray, table: DDIMTable, t_enc: int) -> np.ndarray:
    """Noise x_0 to DDIM step t_enc: sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) z (ldm `stochastic_encode`)."""
    a = table.a_t[_noise_index(table, t_enc)]
    return (np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise).astype(x0.dtype, copy=False)


def img2img_table(table: DDIMTable, t_enc: int) -> DDIMTable:
    """The steps ldm's img2img `decode` runs: ascending ddim_timesteps[:t_enc], in sampling order.

    For t_enc below the table length the first step's timestep is one DDIM step below the noise
    level of `q_sample_ddim` (ldm: noised to ddim_timesteps[t_enc], denoised from [t_enc - 1]).
    """
    start = len(table) - t_enc
    if not 0 <= start <= len(table):
        raise ValueError(f"t_enc must be in [0, {len(table)}], got {t_enc}")
    return DDIMTable(*(_read_only(column[start:]) for column in
                       (table.timesteps, table.a_t, table.a_prev, table.sigma)))
