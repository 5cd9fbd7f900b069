"""`python -m benchmarks.shapes.train`: train `tiny-shapes` on generated shapes (`make train-tiny`).

1. VAE: L1 reconstruction through a posterior sample plus KL_WEIGHT · KL(q(z|x) ‖ N(0, I)).
2. Latents: a fixed set of images is encoded once; an affine map folded into `quant_conv` and
   `post_quant_conv` makes each latent channel zero-mean with std 1/latent_scale_factor, so the
   recipe's factor is right for this VAE and decoding is unchanged.
3. UNet: the ε loss (Ho et al. 2020, eq. 14) at t ~ U{0, …, T−1} of the recipe's DDPM schedule, on
   posterior samples of the set, captions replaced by "" with CAPTION_DROPOUT for classifier-free
   guidance (Ho & Salimans 2022). The text encoder trains with it except its token embedding: the
   captions use a handful of CLIP's 49408 tokens, which the seeded N(0, 1) table already tells apart,
   while the layers must learn word order ("a blue background with a red circle" is a red circle).
   Weights are an EMA of the trained ones (ldm `LitEma`).

Writes the recipe's models as an ldm single file in fp16 and a JSON sidecar `<out>.json` with the
data, seed, steps, losses, timings and commit.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click
import numpy as np
import torch

from benchmarks import provenance
from benchmarks.shapes import data
from sdcompile.recipes import Recipe, load_recipe
from sdcompile.weights import RandomWeights, StableDiffusionModels, load_models, save_ldm_checkpoint
from sdrun.bundle import sha256_file, write_json_atomic
from sdrun.errors import UserError, run_cli
from sdrun.samplers.discretize import alphas_cumprod
from sdrun.tokenizer import VOCAB_FILENAME, ClipTokenizer

RECIPE = "tiny-shapes"
KL_WEIGHT = 1e-6  # ldm's kl-f8 autoencoder config, relative to the reconstruction loss per element
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
GRAD_CLIP_NORM = 1.0
STORED_DTYPE = torch.float16
WEIGHT_BUDGET_BYTES = 20_000_000
LOSS_CURVE_POINTS = 100
FROZEN_TEXT_KEYS = ("transformer.text_model.embeddings.token_embedding.weight",)
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # 2500 UNet steps left the loss falling and the colours unreliable; 6000 are projected to fit 45 minutes at the
    # rates measured on 2 quiet cores with 2 threads (VAE 0.44 s/step, UNet 0.33 s/step, encoding 1-3 min): 43 min.
    vae_steps: int = 1200
    unet_steps: int = 6000
    vae_batch: int = 8
    unet_batch: int = 32
    latent_images: int = 8192  # drawn once and encoded by the trained VAE for the UNet stage
    encode_batch: int = 64
    vae_lr: float = 5e-4
    unet_lr: float = 3e-4
    log_every: int = 50


SMOKE = {"vae_steps": 4, "unet_steps": 4, "latent_images": 64, "log_every": 1}


@dataclasses.dataclass(frozen=True)
class StageLog:
    losses: list[float]
    seconds: float

    def summary(self, points: int = LOSS_CURVE_POINTS) -> dict:
        """Step count, timing, and the loss curve as means over at most `points` equal windows."""
        windows = np.array_split(np.array(self.losses), min(points, len(self.losses)))
        return {"steps": len(self.losses), "seconds": round(self.seconds, 2),
                "seconds_per_step": round(self.seconds / len(self.losses), 4),
                "loss_first": self.losses[0], "loss_last": float(np.mean(windows[-1])),
                "loss_curve": [round(float(w.mean()), 6) for w in windows]}


# --- data ------------------------------------------------------------------------------------------------


def pixels_to_model(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [−1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def clip_tokenizer() -> ClipTokenizer:
    import open_clip

    return ClipTokenizer.from_file(Path(open_clip.__file__).parent / VOCAB_FILENAME)


def caption_ids(tokenizer: ClipTokenizer, captions: Sequence[str]) -> torch.Tensor:
    """(N, 77) int64, padded with the end token as SD1's encoder was trained."""
    return torch.from_numpy(tokenizer(list(captions), tokenizer.end_id).ids).long()


# --- VAE -------------------------------------------------------------------------------------------------


def vae_loss(vae: torch.nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x (B, 3, H, W) in [−1, 1] -> scalar loss, decoding a posterior sample drawn with `generator`."""
    posterior = vae.encode(x)
    noise = torch.randn(posterior.mean.shape, generator=generator)  # (B, 4, H/8, W/8)
    reconstruction = (vae.decode(posterior.sample(noise)) - x).abs().mean()
    kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1.0 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
    return reconstruction + KL_WEIGHT * kl / x[0].numel()


def train_vae(vae, config: TrainConfig, rng: np.random.Generator, generator: torch.Generator, log: Log) -> StageLog:
    vae.train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)

    def step() -> float:
        x = pixels_to_model(data.samples(rng, config.vae_batch)[0])
        return optimizer_step(optimizer, vae.parameters(), vae_loss(vae, x, generator))

    return run_stage("vae", step, config.vae_steps, config.log_every, log)


def optimizer_step(optimizer: torch.optim.Optimizer, parameters, loss: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(parameters), GRAD_CLIP_NORM)
    optimizer.step()
    return float(loss.detach())


def run_stage(name: str, step: Callable[[], float], steps: int, log_every: int, log: Log) -> StageLog:
    losses, start = [], time.perf_counter()
    for index in range(steps):
        losses.append(step())
        if (index + 1) % log_every == 0 or index + 1 == steps:
            elapsed = time.perf_counter() - start
            log(f"{name} step {index + 1}/{steps}: loss {np.mean(losses[-log_every:]):.5f}, "
                f"{elapsed / (index + 1):.3f} s/step")
    return StageLog(losses, time.perf_counter() - start)


# --- latents ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_posteriors(vae, images: np.ndarray, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, 3) uint8 -> the posteriors' mean and std, each (N, 4, H/8, W/8)."""
    vae.eval()
    posteriors = [vae.encode(pixels_to_model(images[i:i + batch])) for i in range(0, len(images), batch)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


@torch.no_grad()
def standardize_latents_(vae, shift: torch.Tensor, gain: torch.Tensor) -> None:
    """Fold z' = gain · (z − shift) (per channel, each (4,)) into the VAE: the encoder's mean and std become
    those of z', and `decode(z')` equals the old `decode(z)`."""
    channels = shift.numel()
    weight, bias = vae.quant_conv.weight, vae.quant_conv.bias  # (2·4, 2·z, 1, 1): mean rows, then log-variance
    weight[:channels] *= gain[:, None, None, None]
    bias[:channels] = gain * (bias[:channels] - shift)
    bias[channels:] += 2.0 * torch.log(gain)
    post = vae.post_quant_conv  # (z, 4, 1, 1)
    post.bias += post.weight[:, :, 0, 0] @ shift
    post.weight /= gain[None, :, None, None]


def standardizing_map(means: torch.Tensor, target_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means (N, 4, h, w) -> (shift, gain), each (4,), making each channel mean 0, std `target_std`."""
    per_channel = means.transpose(0, 1).flatten(1)  # (4, N·h·w)
    return per_channel.mean(dim=1), target_std / per_channel.std(dim=1)


def standardized_latents(vae, images: np.ndarray, batch: int, target_std: float):
    """Encode `images` (N, H, W, 3) uint8 and standardize the VAE to them.

    Returns the standardized posteriors' (mean, std), each (N, 4, H/8, W/8), and the folded-in (shift, gain).
    """
    mean, std = encode_posteriors(vae, images, batch)
    shift, gain = standardizing_map(mean, target_std)
    standardize_latents_(vae, shift, gain)
    return (gain[:, None, None] * (mean - shift[:, None, None]), gain[:, None, None] * std), (shift, gain)


# --- UNet ------------------------------------------------------------------------------------------------


def trainable_text_parameters(text_encoder: torch.nn.Module) -> list[torch.nn.Parameter]:
    for name, parameter in text_encoder.named_parameters():
        parameter.requires_grad_(name not in FROZEN_TEXT_KEYS)
    return [p for p in text_encoder.parameters() if p.requires_grad]


def diffusion_loss(unet, text_encoder, z0: torch.Tensor, ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   alphas_bar: torch.Tensor) -> torch.Tensor:
    """Mean of (ε − ε_θ(x_t, t, c))²; z0 and noise (B, 4, h, w) scaled latents and ε, ids (B, 77), t (B,)."""
    alpha_bar = alphas_bar[t][:, None, None, None]  # (B, 1, 1, 1)
    x_t = alpha_bar.sqrt() * z0 + (1.0 - alpha_bar).sqrt() * noise
    return (unet(x_t, t, text_encoder(ids)) - noise).pow(2).mean()


@torch.no_grad()
def ema_update_(averages: list[torch.Tensor], parameters: list[torch.nn.Parameter], updates: int) -> None:
    """Exponential moving average with ldm `LitEma`'s warm-up: decay min(EMA_DECAY, (1 + n) / (10 + n))."""
    decay = min(EMA_DECAY, (1 + updates) / (10 + updates))
    for average, parameter in zip(averages, parameters):
        average.lerp_(parameter, 1.0 - decay)


def draw_unet_batch(latents: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, null_ids: torch.Tensor,
                    batch: int, scale_factor: float, timesteps: int, generator: torch.Generator):
    """-> z0 (B, 4, h, w) scaled posterior samples, their caption ids (B, 77) with CAPTION_DROPOUT of them
    `null_ids`, t (B,) and ε (B, 4, h, w)."""
    mean, std = latents
    index = torch.randint(len(mean), (batch,), generator=generator)
    z0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scale_factor
    dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
    batch_ids = torch.where(dropped[:, None], null_ids, ids[index])
    t = torch.randint(timesteps, (batch,), generator=generator)
    return z0, batch_ids, t, torch.randn(z0.shape, generator=generator)


def train_unet(models: StableDiffusionModels, recipe: Recipe, latents: tuple[torch.Tensor, torch.Tensor],
               ids: torch.Tensor, null_ids: torch.Tensor, config: TrainConfig, generator: torch.Generator,
               log: Log) -> StageLog:
    """`latents`: posterior mean and std (N, 4, h, w), already standardized; `ids` (N, 77) their captions."""
    unet, text_encoder = models.unet.train().requires_grad_(True), models.text_encoder.train()
    parameters = [*unet.parameters(), *trainable_text_parameters(text_encoder)]
    averages = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.Adam(parameters, lr=config.unet_lr)
    alphas_bar = torch.from_numpy(alphas_cumprod(recipe.schedule)).float()  # (T,)
    updates = itertools.count()

    def step() -> float:
        drawn = draw_unet_batch(latents, ids, null_ids, config.unet_batch, recipe.latent_scale_factor,
                                len(alphas_bar), generator)
        loss = optimizer_step(optimizer, parameters, diffusion_loss(unet, text_encoder, *drawn, alphas_bar))
        ema_update_(averages, parameters, next(updates))
        return loss

    stage = run_stage("unet", step, config.unet_steps, config.log_every, log)
    with torch.no_grad():
        for average, parameter in zip(averages, parameters):
            parameter.copy_(average)
    return stage


# --- the run ---------------------------------------------------------------------------------------------


def train(config: TrainConfig, out: Path, log: Log = print) -> dict:
    """Train every model of the recipe from `config.seed`, write `out` (fp16) and `<out>.json`; returns the sidecar."""
    started = provenance.started()
    recipe = load_recipe(RECIPE)
    rng, generator = np.random.default_rng(config.seed), torch.Generator().manual_seed(config.seed)
    models = load_models(recipe, RandomWeights(config.seed))
    vae_stage = train_vae(models.vae, config, rng, generator, log)
    images, captions, _ = data.samples(rng, config.latent_images)
    encode_start = time.perf_counter()
    latents, standardizing = standardized_latents(models.vae, images, config.encode_batch,
                                                  1.0 / recipe.latent_scale_factor)
    encode_seconds = time.perf_counter() - encode_start
    tokenizer = clip_tokenizer()
    unet_stage = train_unet(models, recipe, latents, caption_ids(tokenizer, captions), caption_ids(tokenizer, [""]),
                            config, generator, log)
    weights = save_fp16(models, out)
    sidecar = describe(config, recipe, weights, vae_stage, unet_stage, encode_seconds, standardizing,
                       provenance.finished(started, torch.get_num_threads()))
    write_json_atomic(sidecar_path(out), sidecar)
    return sidecar


def save_fp16(models: StableDiffusionModels, out: Path) -> Path:
    for component in models.prefixes:
        models.component(component).eval().requires_grad_(False).to(STORED_DTYPE)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_ldm_checkpoint(models, out)


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def describe(config: TrainConfig, recipe: Recipe, weights: Path, vae_stage: StageLog, unet_stage: StageLog,
             encode_seconds: float, standardizing: tuple[torch.Tensor, torch.Tensor], stamp: dict) -> dict:
    shift, gain = standardizing
    return {
        "recipe": recipe.name,
        "weights": {"file": weights.name, "bytes": weights.stat().st_size, "sha256": sha256_file(weights),
                    "dtype": str(STORED_DTYPE).removeprefix("torch.")},
        "seed": config.seed,
        "config": dataclasses.asdict(config),
        "data": {"generator": data.__name__, "image_size": data.IMAGE_SIZE, "palette": data.PALETTE,
                 "shapes": data.SHAPES, "size_range": data.SIZE_RANGE, "phrasings": data.PHRASINGS},
        "losses": {"vae": {"kl_weight": KL_WEIGHT, **vae_stage.summary()},
                   "unet": {"caption_dropout": CAPTION_DROPOUT, "ema_decay": EMA_DECAY, **unet_stage.summary()}},
        "latents": {"encode_seconds": round(encode_seconds, 2), "images": config.latent_images,
                    "channel_mean": shift.tolist(), "channel_gain": gain.tolist()},
        "provenance": stamp,
    }


def projected_seconds(sidecar: dict, config: TrainConfig) -> float:
    """The run time of `config` at the per-step and per-image rates a (smoke) run measured."""
    losses, latents = sidecar["losses"], sidecar["latents"]
    return (losses["vae"]["seconds_per_step"] * config.vae_steps
            + latents["encode_seconds"] / latents["images"] * config.latent_images
            + losses["unet"]["seconds_per_step"] * config.unet_steps)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True,
              help="seeds the data, the initial weights and every noise draw")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="ldm single file to write (.safetensors); the sidecar goes beside it as .json")
@click.option("--vae-steps", type=click.IntRange(min=1), help=f"VAE steps (default {TrainConfig.vae_steps})")
@click.option("--unet-steps", type=click.IntRange(min=1), help=f"UNet steps (default {TrainConfig.unet_steps})")
@click.option("--threads", type=click.IntRange(min=1), help="torch intra-op threads (default: torch's own)")
@click.option("--smoke", is_flag=True,
              help=f"a few steps of each stage ({SMOKE['vae_steps']} VAE, {SMOKE['unet_steps']} UNet, "
                   f"{SMOKE['latent_images']} encoded images) and the full run's time projected from them")
def main(seed, out, vae_steps, unet_steps, threads, smoke) -> None:
    """Train tiny-shapes: the VAE, then the UNet with the text encoder, on generated shapes."""
    if out.suffix != ".safetensors":
        raise UserError(f"cannot write the trained weights to {out.name}.", expected="a .safetensors file",
                        got=out.suffix or "no suffix", fix="name the output file <name>.safetensors")
    if threads is not None:
        torch.set_num_threads(threads)
    steps = {k: v for k, v in (("vae_steps", vae_steps), ("unet_steps", unet_steps)) if v is not None}
    config = TrainConfig(seed=seed, **((SMOKE if smoke else {}) | steps))
    sidecar = train(config, out, log=click.echo)
    click.echo(f"wrote {out} ({sidecar['weights']['bytes'] / 1e6:.2f} MB) and {sidecar_path(out)}")
    if smoke:
        full = TrainConfig(seed=seed)
        click.echo(f"projected full run ({full.vae_steps} VAE steps, {full.latent_images} images encoded, "
                   f"{full.unet_steps} UNet steps) at {torch.get_num_threads()} thread(s): "
                   f"{projected_seconds(sidecar, full) / 60:.1f} min")


if __name__ == "__main__":
    run_cli(main)
