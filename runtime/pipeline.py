"""txt2img / img2img: tokenize ▶ text encoder(s) ▶ sampler loop ▶ VAE decode, written once for every backend.

Prompts are read for emphasis and split into 75-token chunks as the AUTOMATIC1111 web UI does
(`sdrun.tokenizer`, `sdrun.prompt_weights`); each chunk is encoded on its own, weighted, and the chunks'
hidden states are concatenated into a context of 77·chunks tokens, every prompt of a loop (negatives
too) padded with empty chunks to the longest. SDXL's two encoders each read the prompts padded their
own way; their hidden states are concatenated along the features, and the UNet also sees the second's
pooled text (of the first chunk) and six pixel sizes per image (`SizeConditioning`: original size,
crop, target size; default the output size and (0, 0)).

Numerics only: no file I/O here (the CLI reads and writes files), no RNG beyond the
documented generator seeded by the caller: `numpy.random.default_rng(seed)` draws, in this
order, the initial latents (txt2img) or the posterior and forward-noising noise (img2img, drawn
even when --init-noise replaces the latter), then one noise tensor per model evaluation whose
update takes noise (DDIM with eta > 0, the ancestral and SDE samplers, LCM) — all
`standard_normal(..., dtype=float32)`. img2img with DDIM keeps ldm's strength semantics; with
any other sampler diffusers' (`sdrun.samplers.registry.img2img_first_step`).

Inpainting (an image and a mask, `sdrun.masks`) draws as img2img does. At strength 1 it starts from
pure noise (the txt2img plan, as diffusers' inpainting pipeline), below 1 from the noised image as
img2img. An inpainting UNet sees the binarised mask at latent size and the posterior mean of the masked
image's latents (deterministic: a conditioning input needs no sample); an ordinary UNet's latent is
blended with the image's between evaluations (`sdrun.latent_blend`). Either way the decoded pixels are
laid over the input image with the mask as alpha, so the unmasked region keeps the input exactly.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sdrun.backends.base import GraphRunner, StageTimer
from sdrun.bundle import Bundle, Manifest
from sdrun.errors import UserError
from sdrun.generation_request import (GenerationRequest, check_batchable, complete_request,  # noqa: F401
                                      latent_shape, request_plan, size_conditioning, starts_from_image)
from sdrun.latent_blend import latent_blend
from sdrun.masks import latent_mask, mask_warnings, masked_image, overlay
from sdrun.prompt_weights import emphasize
from sdrun.quality import NonFiniteError
from sdrun.sampling import Conditioning, draw_noises, sample_plan, step_feeds
from sdrun.tokenizer import CONTEXT_LENGTH, TokenizedBatch

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # component names, in the recipe's `text_encoders` order
POOLED_OUTPUT = "pooled_embeddings"
CHUNK_TOKENS = CONTEXT_LENGTH - 2  # prompt tokens per chunk, between its start and end tokens


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # (B, H, W, 3) uint8
    latents: np.ndarray  # (B, 4, h, w) float32, final latents before decoding
    decoded: np.ndarray  # (B, 3, H, W) float32 VAE output in [-1, 1] (unclipped; inpainting: before the overlay)
    request: GenerationRequest  # with every default filled in
    timer: StageTimer
    prompt_chunks: int  # 77-token chunks of the context the images were conditioned on
    step_fused: bool
    warnings: tuple[str, ...] = ()  # what the sampler and the prompts' emphasis syntax warn of


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
        self.max_chunks = max_prompt_chunks(bundle.manifest)
        # A backend that runs the whole step-fused loop on its device offers it (TensorRT).
        self.resident_loop = getattr(runners.get("unet_step"), "resident_loop", None)

    def complete(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with every None filled from the recipe, validated (once) before any heavy work."""
        return request if request.validated else complete_request(request, self.recipe)

    def token_ids(self, prompts: list[str], encoder: int = 0) -> TokenizedBatch:
        """`.ids`: (len(prompts), chunks·context_length) int32, padded as the recipe's text encoder `encoder` was trained."""
        config = self.recipe.text_encoders[encoder]
        tokenizer = self.bundle.tokenizer
        return tokenizer(prompts, tokenizer.pad_id(config.padding), config.context_length)

    def text_tokens(self, prompts: list[str]) -> dict[str, TokenizedBatch]:
        """Each text encoder's token ids for `prompts`, by component name."""
        return {name: self.token_ids(prompts, i) for i, name in enumerate(TEXT_ENCODERS[:len(self.recipe.text_encoders)])}

    def sampler_plan(self, request: GenerationRequest):
        """The sampler plan of a completed request (img2img: of the steps its strength keeps)."""
        return request_plan(request, self.recipe, img2img=starts_from_image(request))

    def generate(self, request: GenerationRequest,
                 on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        return self.generate_batch([request], on_step)[0]

    def generate_batch(self, requests: Sequence[GenerationRequest],
                       on_step: Callable[[int, int], None] | None = None) -> list[GenerationResult]:
        """Requests that agree on `batch_key` in one denoising loop (one UNet call per evaluation for all);
        each keeps its own prompts and seed, and its result equals its own `generate` up to the backend's
        batched arithmetic. Each request draws from its own generator, in the order the module states."""
        requests = [self.complete(r) for r in requests]
        check_batchable(requests, self.recipe)
        first = requests[0]
        self.timer = StageTimer()
        started = time.perf_counter()
        rngs = [np.random.default_rng(r.seed) for r in requests]
        conditioning, tokens = self.conditioning(requests)
        plan = self.sampler_plan(first)
        if first.image is None:
            x0, noise = None, np.concatenate([self._initial_noise(r, rng) for r, rng in zip(requests, rngs)])
        else:
            x0, noise = (np.concatenate(parts) for parts in
                         zip(*(self._img2img_latents(r, rng) for r, rng in zip(requests, rngs))))
        drawn = [draw_noises(plan, (r.batch, *noise.shape[1:]), rng) for r, rng in zip(requests, rngs)]
        noises = [None if z[0] is None else np.concatenate(z) for z in zip(*drawn)]
        start = time.perf_counter()
        masks = _batched(requests, "mask") if first.mask is not None else None
        blend = None
        if masks is not None and not self.recipe.unet.inpainting:
            blend = latent_blend(plan, self.recipe.schedule, x0, noise, latent_mask(masks, self.recipe.vae_scale))
        latents = self._denoise(plan, noise, x0, conditioning, first.guidance, noises, on_step, blend)
        self.timer.add("denoise", time.perf_counter() - start)
        decoded = self._decode(latents)
        pixels = decoded if masks is None else overlay(decoded, _batched(requests, "image"), masks)
        self.timer.add("total", time.perf_counter() - started)
        bounds = np.cumsum([0, *(r.batch for r in requests)])
        return [GenerationResult(to_uint8(pixels[a:b]), latents[a:b], decoded[a:b], r, self.timer,
                                 tokens.chunk_count, self.step_fused,
                                 (*plan.warnings, *tokens.warnings, *(mask_warnings(r.mask) if r.mask is not None else ())))
                for r, a, b in zip(requests, bounds, bounds[1:])]

    def _denoise(self, plan, noise, x0, conditioning, guidance, noises, on_step, blend=None) -> np.ndarray:
        def progress(e: int, x: np.ndarray) -> None:
            check_finite(x, f"evaluation {e + 1}/{len(plan)} of {plan.name}")
            if on_step:
                on_step(e + 1, len(plan))

        if self.resident_loop is None or blend is not None:  # the blend runs on the host between steps
            return sample_plan(plan, self.runners, noise, conditioning, guidance, noises, progress, x0, blend)
        feeds = step_feeds(plan, noise, conditioning, guidance, noises, x0)
        start = time.perf_counter()
        latents = self.resident_loop(feeds, on_step)
        self.timer.add("graph:unet_step", time.perf_counter() - start, calls=len(plan))
        check_finite(latents, f"the {len(plan)}-evaluation {plan.name} loop")
        return latents

    def conditioning(self, requests: Sequence[GenerationRequest]) -> tuple[Conditioning, TokenizedBatch]:
        """The UNet's conditioning for N images of completed requests, rows [negatives; prompts] when guided
        (`sdrun.sampling`), and the first encoder's tokens (chunks per prompt, emphasis warnings)."""
        prompts = [r.prompt for r in requests for _ in range(r.batch)]
        guided = requests[0].guidance != 1.0
        negatives = [r.negative_prompt for r in requests for _ in range(r.batch)] if guided else []
        tokens = self.text_tokens(negatives + prompts)
        first = tokens[TEXT_ENCODERS[0]]
        rows = [r for r in requests for _ in range(r.batch)] * (2 if guided else 1)
        for i, (request, chunks) in enumerate(zip(rows, first.chunks)):
            check_chunks(chunks, allowed_chunks(request, self.max_chunks), positive=i >= len(negatives))
        start = time.perf_counter()
        outputs = {name: encode_chunks(self.runners[name], t, config.context_length)
                   for (name, t), config in zip(tokens.items(), self.recipe.text_encoders)}
        context = np.concatenate([out["text_embeddings"] for out in outputs.values()], axis=-1)  # (2N, 77·k, D)
        self.timer.add("text_encoder", time.perf_counter() - start)
        check_finite(context, "text encoder")
        conditioning = {"encoder_hidden_states": context}
        if self.recipe.unet.adm_in_channels:
            sizes = [size_conditioning(r) for r in requests for _ in range(r.batch)]
            conditioning["text_embeds"] = next(o[POOLED_OUTPUT] for o in outputs.values() if POOLED_OUTPUT in o)
            conditioning["time_ids"] = np.array(sizes * (2 if guided else 1), np.float32)  # (2N, 6)
        if self.recipe.unet.inpainting:
            inpainting = self._inpainting_conditioning(requests)
            conditioning |= {name: np.concatenate([rows] * (2 if guided else 1)) for name, rows in inpainting.items()}
        return conditioning, first

    def _initial_noise(self, request: GenerationRequest, rng: np.random.Generator) -> np.ndarray:
        shape = latent_shape(request, self.recipe)
        if request.init_noise is not None:
            return np.ascontiguousarray(request.init_noise, dtype=np.float32)
        return rng.standard_normal(shape, dtype=np.float32)

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

    def _inpainting_conditioning(self, requests: Sequence[GenerationRequest]) -> dict[str, np.ndarray]:
        """An inpainting UNet's extra inputs for N images: the latent mask (N, 1, h, w) and the posterior
        mean of the masked image's latents (N, 4, h, w), already scaled by the latent scale factor."""
        masks = _batched(requests, "mask")
        start = time.perf_counter()
        moments = self.runners["vae_encoder"].run({"images": masked_image(_batched(requests, "image"), masks)})
        self.timer.add("vae_encoder", time.perf_counter() - start)
        mean = np.split(moments["latent"], 2, axis=1)[0]
        return {"mask": latent_mask(masks, self.recipe.vae_scale), "masked_image_latents": np.ascontiguousarray(mean)}

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        images = self.runners["vae_decoder"].run({"latent": latents})["images"].copy()
        self.timer.add("vae_decoder", time.perf_counter() - start)
        check_finite(images, "VAE decoder")
        return images


def _batched(requests: Sequence[GenerationRequest], field: str) -> np.ndarray:
    """A per-image input of the requests (`image` or `mask`, each (batch or 1, C, H, W)) as (N, C, H, W) float32."""
    parts = [np.broadcast_to(getattr(r, field), (r.batch, *getattr(r, field).shape[1:])) for r in requests]
    return np.concatenate(parts).astype(np.float32)


def encode_chunks(runner: GraphRunner, tokens: TokenizedBatch, length: int) -> dict[str, np.ndarray]:
    """A text encoder's outputs for chunked token ids (B, k·length): each chunk encoded on its own and
    weighted (`emphasize`), the hidden states (B, k·length, W) concatenated along the tokens; the pooled
    text is the first chunk's, as the web UI takes it."""
    hidden, pooled = [], {}
    for c in range(tokens.chunk_count):
        window = slice(c * length, (c + 1) * length)
        out = runner.run({"input_ids": np.ascontiguousarray(tokens.ids[:, window])})
        hidden.append(emphasize(out["text_embeddings"], tokens.weights[:, window]))  # a copy: runners reuse buffers
        if c == 0 and POOLED_OUTPUT in out:
            pooled[POOLED_OUTPUT] = out[POOLED_OUTPUT].copy()
    return {"text_embeddings": np.concatenate(hidden, axis=1), **pooled}


def max_prompt_chunks(manifest: Manifest) -> int:
    """The most prompt chunks the bundle's UNet takes: the profile max of its context axis over one encoder
    window (1 for a bundle exported with a fixed 77-token context)."""
    recipe = manifest.recipe
    unet = next((manifest.components[n] for n in ("unet", "unet_step") if n in manifest.components), None)
    profile = unet.profile.get("encoder_hidden_states") if unet is not None else None
    if profile is None:
        return recipe.max_prompt_chunks
    return profile["max"][1] // recipe.text_encoder.context_length


def allowed_chunks(request: GenerationRequest, bundle_max: int) -> int:
    """`request.max_chunks`, or the bundle's most when None; UserError past what the bundle's UNet takes."""
    if request.max_chunks is None:
        return bundle_max
    if request.max_chunks > bundle_max:
        raise UserError(f"--max-chunks {request.max_chunks} is more than this bundle's UNet takes.",
                        expected=f"1..{bundle_max}", got=str(request.max_chunks),
                        fix=f"use --max-chunks {bundle_max} or less, or re-export with a larger max_prompt_chunks")
    return request.max_chunks


def check_chunks(chunks: int, allowed: int, positive: bool) -> None:
    if chunks > allowed:
        which, size = "prompt" if positive else "negative prompt", CHUNK_TOKENS
        raise UserError(f"the {which} fills {chunks} chunks of {size} tokens; at most {allowed} are allowed.",
                        expected=f"at most {allowed} chunks (--max-chunks {allowed}), up to {allowed * size} tokens "
                                 "(fewer where a chunk ends at a comma or BREAK)", got=f"{chunks} chunks",
                        fix=f"shorten the {which}, allow more with --max-chunks (up to the bundle's most), "
                            "or re-export with a larger max_prompt_chunks in the recipe")


def check_prompts(request: GenerationRequest, bundle: Bundle) -> int:
    """Read a completed request's prompts before any heavy work: UserError for a weight that is not a number
    or more chunks than allowed; returns the chunks its context will have (the longer prompt's)."""
    allowed = allowed_chunks(request, max_prompt_chunks(bundle.manifest))
    texts = [request.prompt, *([request.negative_prompt] if request.guidance != 1.0 else [])]
    tokens = bundle.tokenizer(texts, pad_id=0)
    for i, chunks in enumerate(tokens.chunks):
        check_chunks(chunks, allowed, positive=i == 0)
    return tokens.chunk_count


def check_finite(array: np.ndarray, stage: str) -> None:
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise NonFiniteError(f"non-finite values (NaN/inf) appeared after the {stage}: {bad} of {array.size}.",
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
    encoders = TEXT_ENCODERS[:len(manifest.recipe.text_encoders)]
    return [*encoders, "unet_step" if fused else "unet", "vae_decoder", *(["vae_encoder"] if img2img else [])]

