"""The bundle: a self-describing directory made by `sdcompile export`, read by `sdrun`.

Layout:
    manifest.json                  what is here, how it was made, content hashes
    tokenizer/<vocab>.txt.gz       CLIP BPE vocabulary
    <component>/model.onnx         one graph per component (+ model.onnx.data when large)
    <component>/*.plan             TensorRT engines, named by TensorRT version and GPU

Tensor dims are ints or symbols bound at run time (see `ShapeBinding`); the runtime never
re-declares a shape the manifest knows. `open_bundle` reads and verifies a bundle once: the
manifest, the hashes of the components a run needs, and the tokenizer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from sdrun.atomic import write_atomic
from sdrun.errors import UserError
from sdrun.recipe import Recipe, recipe_from_dict
from sdrun.tokenizer import CONTEXT_LENGTH, ClipTokenizer

FORMAT = "sdcompile-bundle"
FORMAT_VERSION = 2  # 2: the step-fused UNet takes a sampler state and update (any sampler)
MANIFEST_NAME = "manifest.json"
WEIGHT_MAP_NAME = "weight_map.json"  # per component: its initializers' checkpoint tensors

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int32"
    dims: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["dims"]))


@dataclasses.dataclass(frozen=True)
class ShapeBinding:
    """Values of the symbolic dims for one run.

    Batch counts prompts; `cfg_batch` is the UNet/text-encoder batch, 2·batch with classifier-free
    guidance and batch without it; `guided_batch` is always 2·batch (the step-fused UNet guides every
    step). Heights and widths in pixels (`image_*`) or latent cells (`latent_*`); `context_tokens` is the
    UNet context's token axis, one text encoder window per prompt chunk (77·chunks).
    """

    batch: int
    cfg_batch: int
    image_height: int
    image_width: int
    vae_scale: int
    context_tokens: int = CONTEXT_LENGTH

    def value(self, symbol: str) -> int:
        values = {"batch": self.batch, "cfg_batch": self.cfg_batch, "guided_batch": 2 * self.batch,
                  "image_height": self.image_height, "image_width": self.image_width,
                  "latent_height": self.image_height // self.vae_scale,
                  "latent_width": self.image_width // self.vae_scale, "context_tokens": self.context_tokens}
        return values[symbol]


def resolve_shape(dims: tuple[int | str, ...], binding: ShapeBinding) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else binding.value(d) for d in dims)


def binding_from_feeds(record: "ComponentRecord", feeds: dict, vae_scale: int) -> ShapeBinding:
    """Recover the symbol values from actual input shapes (every dim is named in the manifest)."""
    values: dict[str, int] = {}
    for spec in record.inputs:
        for dim, size in zip(spec.dims, feeds[spec.name].shape):
            if isinstance(dim, str):
                values[dim] = int(size)
    height = values.get("image_height", values.get("latent_height", 0) * vae_scale)
    width = values.get("image_width", values.get("latent_width", 0) * vae_scale)
    batch = values.get("batch", values.get("cfg_batch", 0))
    return ShapeBinding(batch, values.get("cfg_batch", batch), height, width, vae_scale,
                        values.get("context_tokens", CONTEXT_LENGTH))


@dataclasses.dataclass(frozen=True)
class ComponentRecord:
    """One component's entry in the manifest."""

    name: str
    graph: str  # path relative to the bundle
    files: dict  # relative path -> sha256 of every file the graph needs
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: dict  # input name -> {"min": [...], "opt": [...], "max": [...]}
    precision: str
    passes: tuple[str, ...]
    report: dict = dataclasses.field(default_factory=dict)
    engines: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["inputs"] = [t.to_dict() for t in self.inputs]
        data["outputs"] = [t.to_dict() for t in self.outputs]
        data["passes"] = list(self.passes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ComponentRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["inputs"] = tuple(TensorSpec.from_dict(t) for t in data["inputs"])
        values["outputs"] = tuple(TensorSpec.from_dict(t) for t in data["outputs"])
        values["passes"] = tuple(data["passes"])
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Manifest:
    recipe: Recipe  # stored as `Recipe.to_dict()`
    source: dict  # {"kind": "random", "seed": N} or {"kind": "checkpoint", "path": ...}
    weights_sha256: str
    tokenizer: dict  # {"vocab": relative path, "sha256": ..., "pad_id": int, "context_length": int}
    components: dict  # name -> ComponentRecord
    tools: dict  # package -> version
    loras: list = dataclasses.field(default_factory=list)  # merged at export: `sdrun.lora.lora_record` dicts
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["recipe"] = self.recipe.to_dict()
        data["components"] = {n: c.to_dict() for n, c in self.components.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["recipe"] = recipe_from_dict(data["recipe"])
        values["components"] = {n: ComponentRecord.from_dict(c) for n, c in data["components"].items()}
        return cls(**values)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON (indented, one trailing newline) through a temp file renamed over `path`."""
    write_atomic(path, lambda temp: temp.write_text(json.dumps(data, indent=2) + "\n"))


def read_manifest(bundle: Path) -> Manifest:
    """Parse and structurally validate `bundle/manifest.json` (hashes are checked separately)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise UserError(f"bundle directory {bundle} does not exist.",
                        fix="create one with `sdcompile export --recipe NAME --out DIR ...`")
    if not path.is_file():
        raise UserError(f"{bundle} is not a bundle: {MANIFEST_NAME} is missing.",
                        fix="pass the directory written by `sdcompile export --out DIR`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}).", fix="re-export the bundle") from None
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        recipe = data["recipe"].get("name", "NAME") if isinstance(data.get("recipe"), dict) else "NAME"
        raise UserError(f"{path} has an unsupported format.",
                        expected=f"{FORMAT} version {FORMAT_VERSION}",
                        got=f"{data.get('format')} version {data.get('format_version')}",
                        fix=f"re-export the bundle with this version of sdcompile: sdcompile export --recipe {recipe} "
                            f"--out {bundle} ... --force")
    try:
        return Manifest.from_dict(data)
    except UserError as err:
        raise UserError(f"{path} holds an invalid recipe: {err.problem}", fix="re-export the bundle") from None
    except (KeyError, TypeError) as err:
        raise UserError(f"{path} is missing or has malformed entries ({err}).", fix="re-export the bundle") from None


def verify_component_files(bundle: Path, record: ComponentRecord) -> None:
    """Refuse a component whose files are missing or differ from the hashes in the manifest."""
    for relative, expected in record.files.items():
        path = Path(bundle) / relative
        if not path.is_file():
            raise UserError(f"bundle file {path} is missing.", fix=_reexport_fix(record.name))
        actual = sha256_file(path)
        if actual != expected:
            raise UserError(f"bundle file {path} does not match the manifest (tampered or half-written).",
                            expected=f"sha256 {expected}", got=f"sha256 {actual}", fix=_reexport_fix(record.name))


def require_components(manifest: Manifest, names: list[str], bundle: Path) -> None:
    missing = [n for n in names if n not in manifest.components]
    if missing:
        raise UserError(f"bundle {bundle} lacks the component(s) {', '.join(missing)}.",
                        expected=", ".join(names), got=", ".join(manifest.components) or "none",
                        fix=f"sdcompile export --component {' --component '.join(missing)} --out {bundle} ...")


def reexport_command(component: str, root: Path | str = "BUNDLE", recipe: str = "NAME") -> str:
    return f"sdcompile export --recipe {recipe} --component {component} --out {root} ... --force"


def _reexport_fix(component: str) -> str:
    return f"re-export it: {reexport_command(component)}"


@dataclasses.dataclass(frozen=True)
class Bundle:
    """An opened bundle: its manifest, the components whose files were verified, and its tokenizer."""

    root: Path
    manifest: Manifest
    tokenizer: ClipTokenizer
    verified: frozenset[str]  # components whose files matched their hashes when opened

    @property
    def recipe(self) -> Recipe:
        return self.manifest.recipe

    def component(self, name: str) -> ComponentRecord:
        """The record of a component verified at opening (a component not asked for then is refused)."""
        if name not in self.verified:
            require_components(self.manifest, [name], self.root)
            raise ValueError(f"component {name!r} was not verified when {self.root} was opened")
        return self.manifest.components[name]

    def graph_path(self, name: str) -> Path:
        return self.root / self.component(name).graph

    def rebuild_hint(self, name: str) -> str:
        """The command that re-exports a component of this bundle."""
        return reexport_command(name, self.root, self.recipe.name)


def open_bundle(path: Path, needs: Callable[[Manifest], Sequence[str]] | None = None) -> Bundle:
    """Read the manifest, check the files of the components a run `needs` (a function of the manifest;
    None: every component) and load the tokenizer — each once.

    Every problem is a UserError that names the re-export command.
    """
    root = Path(path)
    manifest = read_manifest(root)
    names = list(manifest.components) if needs is None else list(needs(manifest))
    require_components(manifest, names, root)
    for name in names:
        verify_component_files(root, manifest.components[name])
    return Bundle(root, manifest, load_tokenizer(root, manifest), frozenset(names))


def load_tokenizer(root: Path, manifest: Manifest) -> ClipTokenizer:
    path = root / manifest.tokenizer["vocab"]
    if not path.is_file() or sha256_file(path) != manifest.tokenizer["sha256"]:
        raise UserError(f"tokenizer vocabulary {path} is missing or does not match the manifest.",
                        fix="re-export the bundle with `sdcompile export ... --force`")
    return ClipTokenizer.from_file(path)
