"""GPU check, no TensorRT needed: eager PyTorch timing of the SD 1.5 UNet, the GPU anchor.

The UNet is sdcompile's own model (recipe `sd15`) with seeded random weights, placed the way the
torch backend places it (`sdrun.backends.torch.placed`: cast to fp16, GroupNorms kept in fp32).
One call is 512² with guidance: batch 2, 64×64 latents. The time is the median of N calls after
warm-up, each ended by `torch.cuda.synchronize`. The fp16 output is held to the fp16 gate against
the same UNet in fp32 (TF32 off) on the same device, so a fast but wrong UNet does not pass.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time

from benchmarks.gpu_parts import Check, PartResult

TIMESTEP = 500.0  # mid-schedule


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    recipe: str = "sd15"
    device: str = "cuda"
    dtype: str = "fp16"
    batch: int = 2  # one prompt with classifier-free guidance
    repeats: int = 20
    warmup: int = 3
    seed: int = 0  # random weights and inputs


def torch_anchor_part(config: AnchorConfig = AnchorConfig()) -> PartResult:
    import torch

    from sdrun.backends import BackendOptions
    from sdrun.backends.torch import exact_fp32, placed, placement_from_options
    from sdrun.gates import check_output

    reference_at = placement_from_options(BackendOptions(device=config.device, dtype="fp32"))
    timed_at = placement_from_options(BackendOptions(device=config.device, dtype=config.dtype))
    recipe, module = unet_with_random_weights(config)
    inputs = unet_inputs(recipe, config)
    module = placed(module, reference_at)
    with torch.inference_mode(), exact_fp32(reference_at.exact_fp32_on_cuda):
        reference = module(*[t.to(reference_at.device) for t in inputs]).float().cpu().numpy()
    module = placed(module, timed_at)
    feeds = [t.to(timed_at.device, timed_at.dtype) for t in inputs]
    with torch.inference_mode():
        output = module(*feeds).float().cpu().numpy()
        latency = median_call_ms(lambda: module(*feeds), config, synchronizer(timed_at.device))
    verdict = check_output(f"{config.recipe} unet {config.dtype}", "latent", reference, output,
                           "fp32" if config.dtype == "fp32" else "fp16")
    shape = f"{config.batch}x{recipe.unet.in_channels}x{inputs[0].shape[2]}x{inputs[0].shape[3]}"
    checks = [Check(f"{config.dtype} vs fp32 on {timed_at.device}", verdict.passed, verdict.describe()),
              Check(f"UNet call, latents {shape}", latency["median_ms"] > 0,
                    f"median {latency['median_ms']:.2f} ms, p90 {latency['p90_ms']:.2f} ms over {config.repeats} "
                    f"calls after {config.warmup} warm-up")]
    return PartResult.from_checks("torch cuda", checks, {"config": dataclasses.asdict(config), "latency": latency,
                                                         "accuracy": verdict.to_dict(), **device_facts(torch)})


def unet_with_random_weights(config: AnchorConfig):
    """(recipe, UNet wrapper in eval mode, fp32 on the CPU) with the seeded random weights of `RandomWeights`."""
    from sdcompile.components.unet import UNetWrapper
    from sdcompile.models.unet import UNetModel
    from sdcompile.recipes import load_recipe
    from sdcompile.weights import LDM_PREFIXES, Component, randomize_parameters_

    recipe = load_recipe(config.recipe)
    unet = randomize_parameters_(UNetModel(recipe.unet), config.seed, LDM_PREFIXES[Component.UNET])
    return recipe, UNetWrapper(unet).eval().requires_grad_(False)


def unet_inputs(recipe, config: AnchorConfig) -> list:
    """(sample, timestep, encoder_hidden_states) in fp32 on the CPU, at the recipe's default size."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    latent = (recipe.default_height // recipe.vae_scale, recipe.default_width // recipe.vae_scale)
    context = (config.batch, recipe.text_encoder.context_length, recipe.unet.context_dim)
    return [torch.randn((config.batch, recipe.unet.in_channels, *latent), generator=generator),
            torch.tensor([TIMESTEP]), torch.randn(context, generator=generator)]


def synchronizer(device):
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_call_ms(call, config: AnchorConfig, synchronize) -> dict:
    """Median, p90 and min milliseconds of `call` after warm-up; each call waits for the device to finish."""
    for _ in range(config.warmup):
        call()
    synchronize()
    times = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        call()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(times)
    return {"median_ms": statistics.median(times), "p90_ms": ordered[math.ceil(0.9 * len(ordered)) - 1],
            "min_ms": ordered[0], "calls": len(times)}


def device_facts(torch) -> dict:
    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        facts.update(device=torch.cuda.get_device_name(), cudnn=torch.backends.cudnn.version())
    return facts
