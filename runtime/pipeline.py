"""txt2img / img2img: tokenize ▶ text encoder ▶ DDIM loop ▶ VAE decode, written once for every backend.

Numerics only: no file I/O here (the CLI reads and writes files), no RNG beyond the
documented generator seeded by the caller: `numpy.random.default_rng(seed)` draws, in this
order, the initial latents (txt2img) or the posterior and forward-noising noise (img2img, drawn
even when --init-noise replaces the latter), then one noise tensor per step that takes noise
(DDIM with eta > 0; per model evaluation for the stochastic samplers) — all
`standard_normal(..., dtype=float32)`. img2img with DDIM keeps ldm's strength semantics; with
any other sampler diffusers' (`sdrun.samplers.registry.img2img_first_step`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import numpy as np

from sdrun import schedulers
from sdrun.backends.base import DenoisePlan, GraphRunner, StageTimer
from sdrun.bundle import Bundle, Manifest
from sdrun.errors import UserError
from sdrun.recipe import Recipe, ShapeRange
from sdrun.sampling import is_planned, sample_plan, sampler_plan
from sdrun.tokenizer import TokenizedBatch


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int | None = None  # None: the recipe's default
    guidance: float | None = None  # None: the recipe's default
    seed: int = 0
    height: int | None = None  # None: the recipe's default (pixels)
    width: int | None = None
    batch: int = 1
    eta: float = 0.0
    init_noise: np.ndarray | None = None  # (batch, 4, h, w) float32 instead of the seeded draw
    image: np.ndarray | None = None  # img2img input (batch or 1, 3, H, W) float32 in [-1, 1]
    strength: float = 0.75  # img2img: fraction of the schedule re-run
    sampler: str | None = None  # a name or id from `sdrun samplers`; None: the recipe's default (DDIM)
    karras: bool | None = None  # Karras sigmas (samplers that have sigmas); None: the sampler's default
    spacing: str | None = None  # timestep spacing leading | linspace | trailing; None: the sampler's default
    validated: bool = dataclasses.field(default=False, compare=False)  # set by `complete_request` alone


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    latents: np.ndarray  # (B, 4, h, w) float32, final latents before decoding
    decoded: np.ndarray  # (B, 3, H, W) float32 VAE output in [-1, 1] (unclipped) before quantisation
    request: GenerationRequest  # with every default filled in
    timer: StageTimer
    dropped_tokens: tuple[int, ...]  # per prompt, tokens cut off at 77
    step_fused: bool
    warnings: tuple[str, ...] = ()  # what the sampler warns of (e.g. LCM with guidance > 1)


class Pipeline:
    """txt2img / img2img over an opened bundle and one runner per component it needs.

    The runners come from the caller (`sdrun.session.load_pipeline`, the benchmark, a server): which
    backend and which UNet variant is their choice; the pipeline uses `unet_step` when it is given.
    """

    def __init__(self, bundle: Bundle, runners: Mapping[str, GraphRunner]):
        self.bundle, self.recipe = bundle, bundle.recipe
        self.timer = StageTimer()
        self.runners = {name: _TimedRunner(r, name, self) for name, r in runners.items()}
        self.step_fused = "unet_step" in runners
        # A backend that runs the whole step-fused loop on its device offers it (TensorRT).
        self.resident_loop = getattr(runners.get("unet_step"), "resident_loop", None)

    def complete(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with every None filled from the recipe, validated (once) before any heavy work."""
        return request if request.validated else complete_request(request, self.recipe)

    def token_ids(self, prompts: list[str]) -> TokenizedBatch:
        """`.ids`: (len(prompts), context_length) int32, padded as the bundle's text encoder was trained."""
        tokenizer = self.bundle.manifest.tokenizer
        return self.bundle.tokenizer(prompts, tokenizer["pad_id"], tokenizer["context_length"])

    def plan(self, request: GenerationRequest, rng: np.random.Generator, table=None) -> DenoisePlan:
        """The per-step coefficients of a completed request (its DDIM table unless `table` is given)."""
        table = table or ddim_table_of(self.recipe, request.steps, request.eta)
        return denoise_plan(table, self.recipe, request.guidance, rng, latent_shape(request, self.recipe))

    def generate(self, request: GenerationRequest,
                 on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        request = self.complete(request)
        self.timer = StageTimer()
        started = time.perf_counter()
        rng = np.random.default_rng(request.seed)
        context, dropped = self._encode_prompts(request)
        if is_planned(request.sampler, request.karras, request.spacing):
            return self._generate_planned(request, context, dropped, rng, on_step, started)
        table = ddim_table_of(self.recipe, request.steps, request.eta)
        if request.image is None:
            latents = self._initial_noise(request, rng)
        else:
            latents, table = self._img2img_start(request, table, rng)
        plan = self.plan(request, rng, table)
        start = time.perf_counter()
        latents = self._denoise(latents, context, plan, on_step)
        self.timer.add("denoise", time.perf_counter() - start)
        decoded = self._decode(latents)
        self.timer.add("total", time.perf_counter() - started)
        return GenerationResult(to_uint8(decoded), latents, decoded, request, self.timer, dropped, self.step_fused)

    def _generate_planned(self, request, context, dropped, rng, on_step, started) -> GenerationResult:
        plan = planned_request_plan(request, self.recipe, img2img=request.image is not None)
        if request.image is None:
            x0, noise = None, self._initial_noise(request, rng)
        else:
            x0, noise = self._img2img_latents(request, rng)
        start = time.perf_counter()
        latents = sample_plan(plan, self.runners, noise, context, request.guidance, rng, on_step, x0)
        self.timer.add("denoise", time.perf_counter() - start)
        decoded = self._decode(latents)
        self.timer.add("total", time.perf_counter() - started)
        return GenerationResult(to_uint8(decoded), latents, decoded, request, self.timer, dropped, False,
                                plan.warnings)

    def _denoise(self, latents: np.ndarray, context: np.ndarray, plan: DenoisePlan, on_step) -> np.ndarray:
        if self.resident_loop is None:
            return denoise(self.runners, latents, context, plan, self.step_fused, on_step)
        start = time.perf_counter()
        latents = self.resident_loop(latents, context, plan, on_step)
        self.timer.add("graph:unet_step", time.perf_counter() - start, calls=plan.steps)
        check_finite(latents, f"the {plan.steps}-step denoising loop")
        return latents

    def _encode_prompts(self, request: GenerationRequest) -> tuple[np.ndarray, tuple[int, ...]]:
        prompts = [request.prompt] * request.batch
        if request.guidance != 1.0:
            prompts = [request.negative_prompt] * request.batch + prompts
        tokens = self.token_ids(prompts)
        start = time.perf_counter()
        context = self.runners["text_encoder"].run({"input_ids": tokens.ids})["text_embeddings"].copy()
        self.timer.add("text_encoder", time.perf_counter() - start)
        check_finite(context, "text encoder")
        return context, tokens.dropped

    def _initial_noise(self, request: GenerationRequest, rng: np.random.Generator) -> np.ndarray:
        shape = latent_shape(request, self.recipe)
        if request.init_noise is not None:
            return np.ascontiguousarray(request.init_noise, dtype=np.float32)
        return rng.standard_normal(shape, dtype=np.float32)

    def _img2img_start(self, request, table, rng) -> tuple[np.ndarray, schedulers.DDIMTable]:
        """Encode the image, sample its posterior and noise it to step t_enc (ldm img2img)."""
        x0, noise = self._img2img_latents(request, rng)
        t_enc = schedulers.img2img_start(request.steps, request.strength)
        return schedulers.q_sample_ddim(x0, noise, table, t_enc), schedulers.img2img_table(table, t_enc)

    def _img2img_latents(self, request, rng) -> tuple[np.ndarray, np.ndarray]:
        """(x_0, z): a posterior sample of the encoded image and the unit forward noise, both (B, 4, h, w)."""
        image = np.broadcast_to(request.image, (request.batch, *request.image.shape[1:])).astype(np.float32)
        start = time.perf_counter()
        moments = self.runners["vae_encoder"].run({"images": image})["latent"]
        self.timer.add("vae_encoder", time.perf_counter() - start)
        mean, std = np.split(moments, 2, axis=1)  # already scaled by the latent scale factor
        x0 = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        if request.init_noise is not None:
            noise = np.ascontiguousarray(request.init_noise, dtype=np.float32)
        return x0, noise

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        images = self.runners["vae_decoder"].run({"latent": latents})["images"].copy()
        self.timer.add("vae_decoder", time.perf_counter() - start)
        check_finite(images, "VAE decoder")
        return images


def denoise(runners: dict[str, GraphRunner], x: np.ndarray, context: np.ndarray, plan: DenoisePlan,
            fused: bool, on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The DDIM loop: one step-fused graph call per step, or UNet + guidance + update on the host."""
    if fused and not plan.uses_cfg:
        context = np.concatenate([context, context])  # the fused graph always guides: [cond; cond]
    zeros = np.zeros_like(x)
    for i in range(plan.steps):
        timestep = plan.timesteps[i:i + 1]
        noise = plan.noise[i] if plan.noise is not None else zeros
        if fused:
            coefficients = np.array([plan.c_x[i], plan.c_out[i], plan.sigma[i]], dtype=np.float32)
            x = runners["unet_step"].run({
                "sample": x, "timestep": timestep, "encoder_hidden_states": context,
                "guidance": np.array([plan.guidance], dtype=np.float32),
                "step_coefficients": coefficients, "noise": noise})["latent"].copy()
        else:
            sample = np.concatenate([x, x]) if plan.uses_cfg else x
            output = runners["unet"].run({"sample": sample, "timestep": timestep,
                                          "encoder_hidden_states": context})["latent"]
            guided = schedulers.classifier_free_guidance(*np.split(output, 2), plan.guidance) \
                if plan.uses_cfg else output
            x = (plan.c_x[i] * x + plan.c_out[i] * guided + plan.sigma[i] * noise).astype(np.float32)
        check_finite(x, f"denoising step {i + 1}/{plan.steps}")
        if on_step:
            on_step(i + 1, plan.steps)
    return x


def denoise_plan(table: schedulers.DDIMTable, recipe: Recipe, guidance: float, rng: np.random.Generator,
                 latent_shape: tuple[int, ...]) -> DenoisePlan:
    c_x, c_out = schedulers.ddim_step_coefficients(table.a_t, table.a_prev, table.sigma, recipe.parameterization)
    noise = None
    if np.any(table.sigma > 0):
        noise = rng.standard_normal((len(table), *latent_shape), dtype=np.float32)
    return DenoisePlan(timesteps=table.timesteps.astype(np.float32), c_x=c_x.astype(np.float32),
                       c_out=c_out.astype(np.float32), sigma=table.sigma.astype(np.float32),
                       guidance=float(guidance), noise=noise)


def complete_request(request: GenerationRequest, recipe: Recipe) -> GenerationRequest:
    """Fill None fields from the recipe and validate everything before any heavy work."""
    filled = dataclasses.replace(
        request,
        steps=recipe.default_steps if request.steps is None else request.steps,
        guidance=recipe.default_guidance if request.guidance is None else request.guidance,
        height=recipe.default_height if request.height is None else request.height,
        width=recipe.default_width if request.width is None else request.width,
        sampler=recipe.default_sampler if request.sampler is None else request.sampler)
    validate_request(filled, recipe, img2img=request.image is not None)
    return dataclasses.replace(filled, validated=True)


def validate_request(request: GenerationRequest, recipe: Recipe, img2img: bool) -> None:
    if isinstance(request.steps, bool) or not isinstance(request.steps, int) or request.steps < 1:
        raise UserError("steps must be a positive integer.", got=repr(request.steps), fix="e.g. --steps 50")
    for axis, value in (("height", request.height), ("width", request.width)):
        _check_size(axis, value, getattr(recipe.shapes, axis), recipe.size_multiple)
    batch = recipe.shapes.batch
    if not batch.min <= request.batch <= batch.max:
        raise UserError("batch is outside the bundle's profile.", expected=f"{batch.min}..{batch.max}",
                        got=str(request.batch), fix="lower --batch or widen shapes.batch in the recipe")
    if is_planned(request.sampler, request.karras, request.spacing):
        _check_planned(request, recipe, img2img)
    elif img2img:
        schedulers.img2img_start(request.steps, request.strength)
    if request.guidance < 1.0:
        raise UserError("guidance must be >= 1.", got=str(request.guidance), fix="use 1 (off) or e.g. 7.5")
    if request.init_noise is not None:
        expected = latent_shape(request, recipe)
        if tuple(request.init_noise.shape) != expected:
            raise UserError("--init-noise has the wrong shape.", expected=str(expected),
                            got=str(tuple(request.init_noise.shape)),
                            fix="save (batch, 4, height/8, width/8) float32 noise with numpy.save")


def _check_planned(request: GenerationRequest, recipe: Recipe, img2img: bool) -> None:
    """Every sampler option (img2img strength included) is checked by building its plan (milliseconds)
    before any heavy work."""
    planned_request_plan(request, recipe, img2img)


def planned_request_plan(request: GenerationRequest, recipe: Recipe, img2img: bool):
    """The sampler plan of a request; for img2img, of the steps `request.strength` keeps."""
    strength = request.strength if img2img else None
    return sampler_plan(recipe, request.sampler, request.steps, request.karras, request.spacing, request.eta,
                        request.guidance, strength)


def _check_size(axis: str, value: int, allowed: ShapeRange, multiple: int) -> None:
    if value % multiple:
        raise UserError(f"{axis} {value} is not a multiple of {multiple}.",
                        expected=f"a multiple of {multiple} (8 pixels per latent × {multiple // 8} UNet levels)",
                        got=str(value), fix=f"use {max(multiple, value - value % multiple)}")
    if not allowed.min <= value <= allowed.max:
        raise UserError(f"{axis} {value} is outside the bundle's profile.",
                        expected=f"{allowed.min}..{allowed.max}", got=str(value),
                        fix="pick a size in range, or widen shapes in the recipe and re-export")


def latent_shape(request: GenerationRequest, recipe: Recipe) -> tuple[int, int, int, int]:
    scale = recipe.vae_scale
    return (request.batch, recipe.unet.in_channels, request.height // scale, request.width // scale)


def check_finite(array: np.ndarray, stage: str) -> None:
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise UserError(f"non-finite values (NaN/inf) appeared after the {stage}: {bad} of {array.size}.",
                        fix="an fp16 graph overflowed: re-export in fp32, or keep the overflowing nodes in "
                            "fp32 (sdcompile export --precision fp16 with more fp32 islands)")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as the original scripts clamp((x + 1) / 2)."""
    scaled = np.clip((images + 1.0) / 2.0, 0.0, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8).transpose(0, 2, 3, 1)


class _TimedRunner:
    """Adds each call's seconds to the owning pipeline's current timer under 'graph:<component>'."""

    def __init__(self, runner: GraphRunner, name: str, owner: Pipeline):
        self.runner, self.name, self.owner = runner, name, owner
        self.rebuild_hint = runner.rebuild_hint

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        result = self.runner.run(feeds)
        self.owner.timer.add(f"graph:{self.name}", time.perf_counter() - start)
        return result


def needed_components(manifest: Manifest, step_fusion: bool | None, img2img: bool) -> list[str]:
    """The components a run loads: one UNet variant only, so its weights are in memory once."""
    fused = "unet_step" in manifest.components if step_fusion is None else step_fusion
    return ["text_encoder", "unet_step" if fused else "unet", "vae_decoder", *(["vae_encoder"] if img2img else [])]


def ddim_table_of(recipe: Recipe, steps: int, eta: float) -> schedulers.DDIMTable:
    return schedulers.ddim_table(recipe.schedule, steps, eta)
