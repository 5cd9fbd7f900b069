"""The recipe: architecture, schedule, parameterization and shape ranges of one Stable Diffusion model.

Frozen dataclasses shared by both packages: `sdcompile` loads them from `recipes/*.toml`, a bundle's
manifest stores them as plain data, and the runtime reads them back typed. Every key is checked:
an unknown key or a wrong type is an error that names the source, the key and the expected type.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path

from sdrun.errors import UserError


class Family(enum.Enum):
    """Model family; decides checkpoint key layout of the text encoder."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"  # two text encoders (CLIP ViT-L/14 + OpenCLIP ViT-bigG/14), pooled text and size conditioning


class Parameterization(enum.Enum):
    """What the UNet predicts."""

    EPS = "eps"  # the noise ε (SD 1.x, SD 2.x base)
    V = "v"  # v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022; SD 2.x 768-v)


class TextEncoderKind(enum.Enum):
    """CLIP ViT-L/14 in Hugging Face layout (SD1) or OpenCLIP ViT-H/14 in open_clip layout (SD2)."""

    CLIP = "clip"
    OPENCLIP = "openclip"


class TextActivation(enum.Enum):
    QUICK_GELU = "quick_gelu"  # x·sigmoid(1.702x), OpenAI CLIP
    GELU = "gelu"  # exact erf GELU, OpenCLIP ViT-H


class TextOutputLayer(enum.Enum):
    LAST = "last"  # all layers, then the final LayerNorm (SD1)
    PENULTIMATE = "penultimate"  # all but the last layer, then the final LayerNorm (SD2)
    PENULTIMATE_HIDDEN = "penultimate_hidden"  # all but the last layer, no final LayerNorm (SDXL, both encoders)


class TokenizerPadding(enum.Enum):
    END_TOKEN = "end_token"  # pad with <end_of_text> = 49407 (SD1, HF CLIPTokenizer)
    ZERO = "zero"  # pad with id 0 = "!" (SD2, open_clip.tokenize)


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """DDPM training schedule: β = linspace(sqrt(linear_start), sqrt(linear_end), timesteps)²."""

    linear_start: float
    linear_end: float
    timesteps: int


# What an inpainting UNet reads after the latent, in order, and each one's channels: the mask at latent
# size (1 = repaint) and the latents of the image with that region set to 0 (ldm's `c_concat`).
INPAINT_CHANNELS = {"mask": 1, "masked_image_latents": 4}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """ldm `openaimodel.UNetModel` arguments (num_heads or num_head_channels, the other −1).

    `transformer_depth` is one depth for every level (SD1/SD2) or one per level (SDXL); a level has a
    SpatialTransformer where its downsampling factor is in `attention_resolutions` and its depth is > 0.
    `mid_transformer_depth` None means the last level's depth. `adm_in_channels` > 0 adds the `label_emb`
    MLP over the extra conditioning vector y (SDXL: pooled text + sinusoidal size values of
    `size_embed_dim` each); 0 means none.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    context_dim: int
    num_heads: int = -1
    num_head_channels: int = -1
    transformer_depth: int | tuple[int, ...] = 1
    use_linear_in_transformer: bool = False
    mid_transformer_depth: int | None = None
    adm_in_channels: int = 0
    size_embed_dim: int = 256

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer at UNet level `level` (0 = full resolution)."""
        depth = self.transformer_depth
        return depth if isinstance(depth, int) else depth[level]

    @property
    def mid_depth(self) -> int:
        if self.mid_transformer_depth is not None:
            return self.mid_transformer_depth
        return self.depth_at(len(self.channel_mult) - 1)

    def has_attention(self, level: int) -> bool:
        return 2 ** level in self.attention_resolutions and self.depth_at(level) > 0

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet (ldm's `hybrid` conditioning): it also reads the mask and the masked image's
        latents, concatenated after the latent (`INPAINT_CHANNELS`)."""
        return self.in_channels == self.out_channels + sum(INPAINT_CHANNELS.values())


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """ldm `AutoencoderKL` ddconfig; the latent has `embed_dim` channels at 1/2^(len(ch_mult)−1) size."""

    embed_dim: int
    z_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    in_channels: int = 3
    out_ch: int = 3


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    kind: TextEncoderKind
    width: int
    heads: int
    layers: int
    activation: TextActivation
    output_layer: TextOutputLayer
    padding: TokenizerPadding
    vocab_size: int = 49408
    context_length: int = 77
    pooled_output: bool = False  # also return ln_final at the end token @ text_projection (SDXL's encoder 2)

    @property
    def hidden_state_blocks(self) -> int:
        """How many transformer blocks feed the output hidden states."""
        return self.layers if self.output_layer is TextOutputLayer.LAST else self.layers - 1

    @property
    def blocks_run(self) -> int:
        """How many transformer blocks feed any output (the pooled one runs them all)."""
        return self.layers if self.pooled_output else self.hidden_state_blocks


@dataclasses.dataclass(frozen=True)
class ShapeRange:
    """min ≤ opt ≤ max; `opt` is what engines are tuned for."""

    min: int
    opt: int
    max: int


@dataclasses.dataclass(frozen=True)
class ShapeRanges:
    """Ranges for dynamic axes and engine profiles; sizes in pixels, batch in prompts (before CFG)."""

    batch: ShapeRange
    height: ShapeRange
    width: ShapeRange


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    family: Family
    parameterization: Parameterization
    latent_scale_factor: float
    default_height: int
    default_width: int
    default_steps: int
    default_guidance: float
    schedule: DDPMSchedule
    unet: UNetConfig
    vae: AutoencoderConfig
    text_encoder: TextEncoderConfig
    shapes: ShapeRanges
    text_encoder_2: TextEncoderConfig | None = None  # SDXL: its hidden states are concatenated after encoder 1's
    default_sampler: str = "ddim"  # a name or id from `sdrun samplers`
    # Long prompts: the UNet's context takes 1..this many chunks of `text_encoder.context_length` tokens
    max_prompt_chunks: int = 3

    @property
    def max_context_tokens(self) -> int:
        """The longest context the UNet graph takes (tokens): every chunk is one text encoder window."""
        return self.max_prompt_chunks * self.text_encoder.context_length

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for every SD model)."""
        return 2 ** (len(self.vae.ch_mult) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this so that every UNet down/up level lines up."""
        return self.vae_scale * 2 ** (len(self.unet.channel_mult) - 1)

    @property
    def text_encoders(self) -> tuple[TextEncoderConfig, ...]:
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    def to_dict(self) -> dict:
        return _to_plain(self)


def recipe_from_dict(data: dict, source: str = "<manifest>") -> Recipe:
    """A validated recipe from plain data: a recipe file's tables or `Recipe.to_dict()` (as in a manifest).

    `source` names where the data came from in error messages.
    """
    recipe = _build(Recipe, data, Path(source), "")
    _check_recipe(recipe, Path(source))
    return recipe


def _check_recipe(recipe: Recipe, path: Path) -> None:
    _check_sampler(recipe.default_sampler, path)
    if recipe.max_prompt_chunks < 1:
        raise UserError(f"{path}: max_prompt_chunks must be at least 1.", got=str(recipe.max_prompt_chunks),
                        fix="use 1 (prompts of up to 75 tokens) or more")
    for axis in ("batch", "height", "width"):
        rng = getattr(recipe.shapes, axis)
        if not 1 <= rng.min <= rng.opt <= rng.max:
            raise UserError(f"{path}: shapes.{axis} must satisfy 1 <= min <= opt <= max.",
                            got=f"min={rng.min} opt={rng.opt} max={rng.max}", fix="reorder the values")
        if axis != "batch" and any(v % recipe.size_multiple for v in (rng.min, rng.opt, rng.max)):
            raise UserError(f"{path}: shapes.{axis} values must be multiples of {recipe.size_multiple}.",
                            got=f"min={rng.min} opt={rng.opt} max={rng.max}", fix="round them")
    unet = recipe.unet
    if (unet.num_heads == -1) == (unet.num_head_channels == -1):
        raise UserError(f"{path}: unet needs exactly one of num_heads and num_head_channels.",
                        got=f"num_heads={unet.num_heads} num_head_channels={unet.num_head_channels}",
                        fix="set one of them and leave the other out")
    _check_depths(unet, path)
    if unet.in_channels != unet.out_channels and not unet.inpainting:
        inpaint = unet.out_channels + sum(INPAINT_CHANNELS.values())
        raise UserError(f"{path}: unet.in_channels must equal out_channels, or out_channels + "
                        f"{inpaint - unet.out_channels} for an inpainting UNet (mask and masked-image latents).",
                        got=f"in_channels={unet.in_channels} out_channels={unet.out_channels}",
                        fix=f"set in_channels to {unet.out_channels} or {inpaint}")
    widths = [encoder.width for encoder in recipe.text_encoders]
    if unet.context_dim != sum(widths):
        raise UserError(f"{path}: unet.context_dim must equal the sum of the text encoders' widths.",
                        got=f"{unet.context_dim} vs {' + '.join(map(str, widths))}", fix="make them equal")
    _check_pooled_conditioning(recipe, path)


def _check_depths(unet: UNetConfig, path: Path) -> None:
    depth = unet.transformer_depth
    if not isinstance(depth, int) and len(depth) != len(unet.channel_mult):
        raise UserError(f"{path}: unet.transformer_depth needs one depth per level (as many as channel_mult).",
                        got=f"{len(depth)} depths for {len(unet.channel_mult)} levels",
                        fix="list one depth per level, or give a single number for all")


def _check_pooled_conditioning(recipe: Recipe, path: Path) -> None:
    """The pooled text of the encoder that has one, and the size values, must fill `adm_in_channels`."""
    from sdrun.sdxl_conditioning import SIZE_VALUES

    pooled = [encoder for encoder in recipe.text_encoders if encoder.pooled_output]
    if any(e.kind is not TextEncoderKind.OPENCLIP for e in pooled) or len(pooled) > 1:
        raise UserError(f"{path}: pooled_output is supported on one OpenCLIP text encoder.",
                        got=", ".join(e.kind.value for e in pooled), fix="set it on text_encoder_2 only")
    unet = recipe.unet
    expected = pooled[0].width + SIZE_VALUES * unet.size_embed_dim if pooled else 0
    if unet.adm_in_channels != expected:
        raise UserError(f"{path}: unet.adm_in_channels must be the pooled text width plus {SIZE_VALUES} size "
                        "embeddings of unet.size_embed_dim (0 without a pooled text encoder).",
                        got=f"{unet.adm_in_channels}, expected {expected}", fix=f"set it to {expected}")


def _check_sampler(name: str, path: Path) -> None:
    from sdrun.samplers import resolve_sampler

    try:
        resolve_sampler(name)
    except UserError as err:
        raise UserError(f"{path}: default_sampler {name!r} is not a sampler.", expected=err.expected,
                        fix="name one of them (`sdrun samplers`)") from None


def _build(cls, data, path: Path, where: str):
    """Build dataclass `cls` from TOML data, checking keys and types."""
    if not isinstance(data, dict):
        raise _type_error(path, where, "a table", data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{path}: unknown key {_join(where, unknown[0])!r}.",
                        expected=f"one of {', '.join(sorted(fields))}", got=unknown[0],
                        fix="remove or rename the key")
    values = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING:
                raise UserError(f"{path}: missing key {_join(where, name)!r}.",
                                expected=_describe(hints[name]), fix="add the key")
            continue
        values[name] = _convert(hints[name], data[name], path, _join(where, name))
    return cls(**values)


def _convert(hint, value, path: Path, where: str):
    origin = typing.get_origin(hint)
    if isinstance(hint, types.UnionType):
        return _convert_union(hint, value, path, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        allowed = [m.value for m in hint]
        if value not in allowed:
            raise _type_error(path, where, " | ".join(map(repr, allowed)), value)
        return hint(value)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list):
            raise _type_error(path, where, _describe(hint), value)
        return tuple(_convert(item, v, path, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise _type_error(path, where, _describe(hint), value)
    return value


def _convert_union(hint, value, path: Path, where: str):
    """`None` where the hint allows it, else the first alternative that accepts `value` (a single one
    reports its own error)."""
    alternatives = [a for a in typing.get_args(hint) if a is not types.NoneType]
    if value is None and len(alternatives) < len(typing.get_args(hint)):
        return None
    if len(alternatives) == 1:
        return _convert(alternatives[0], value, path, where)
    for alternative in alternatives:
        try:
            return _convert(alternative, value, path, where)
        except UserError:
            continue
    raise _type_error(path, where, _describe(hint), value)


def _type_error(path: Path, where: str, expected: str, value) -> UserError:
    return UserError(f"{path}: key {where!r} has the wrong type.", expected=expected,
                     got=f"{value!r} ({type(value).__name__})", fix="correct the value")


def _describe(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " | ".join(repr(m.value) for m in hint)
    if isinstance(hint, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value
