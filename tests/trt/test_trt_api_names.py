"""Every TensorRT name our code uses exists in TensorRT's published Python API (and every CUDA name
in the installed cuda-bindings: see the last section).

TensorRT cannot run here, so its API is checked by name against the type stubs of one
release (`tensorrt-stubs`, TensorRT 10.13, installed in the venv). The stubs do not import
(some signatures are not valid Python), so they are read line by line: classes with their
bases, methods with return types, attributes and enum members with their types.

The oldest release we support (`MIN_TENSORRT`, 10.8) was found by running this module against
the stubs of every older release on PyPI, each unpacked from its wheel and named by
SDCOMPILE_TENSORRT_STUBS (`pip download --no-deps tensorrt-stubs==10.8.0.43.1 -d DIR`, unzip,
`SDCOMPILE_TENSORRT_STUBS=DIR/unpacked pytest tests/trt/test_trt_api_names.py`): 10.8.0.43.1,
10.9.0.34.1, 10.10.0.31.1, 10.11.0.33.1 and 10.12.0.36.1 publish every name both files use, the
TF32 flag and `IBuilderConfig.clear_flag` included. 10.8 is the oldest release with stubs, so
nothing older can be checked; CI, offline, checks against the installed 10.13.

Which TensorRT class an object belongs to is inferred, not guessed from variable names:
- `trt` is the tensorrt module (both files bind it under that name, and only that name);
- a parameter annotated `trt.X` (or `trt.X | None`, a string annotation too) holds an X;
- calling a TensorRT class makes an instance; calling a method gives its stub return type;
  reading an attribute or property gives its stub type;
- our own functions annotated `-> trt.X` or `-> tuple[trt.X, trt.Y]` type their results,
  including tuple unpacking; `self.attr = <typed>` types `self.attr` in every method.
Every attribute read on a typed receiver is checked. `EXPECTED_USES` proves the inference
reaches the calls that matter: if a refactor loses a type, that test names what went dark.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import os
import re
from pathlib import Path

import pytest

from sdrun.backends.tensorrt import MIN_TENSORRT

ROOT = Path(__file__).resolve().parents[2]
CHECKED_FILES = ("sdcompile/trt.py", "runtime/backends/tensorrt.py", "runtime/backends/tensorrt_runner.py",
                 "runtime/backends/tensorrt_loop.py")
STUBS = "tensorrt-stubs"
STUBS_INSTALL = ".venv/bin/pip install --no-deps tensorrt-stubs==10.13.0.35.1"
STUBS_OVERRIDE = "SDCOMPILE_TENSORRT_STUBS"  # an unpacked tensorrt-stubs wheel to check against instead

# Names added after TensorRT 10.13 that our code uses on newer releases only ("Class.member": why).
# Empty: the TensorRT 11 branch (network_flags) uses no new name, it only omits STRONGLY_TYPED.
TENSORRT_11_ADDITIONS: dict[str, str] = {}

# Names TensorRT 11 removed (migration guide, "Removed Python APIs"): flagged even though 10.13 has them.
REMOVED_IN_TENSORRT_11 = {
    "BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.INT4",
    "BuilderFlag.FP4", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.DIRECT_IO", "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile",
    "IBuilderConfig.get_calibration_profile", "IBuilderConfig.set_quantization_flag",
    "IBuilderConfig.get_quantization_flag", "IBuilderConfig.quantization_flags",
    "IBuilderConfig.clear_quantization_flag", "ICudaEngine.device_memory_size", "Builder.platform_has_fast_fp16",
}
# Removed names we use on purpose, each on a branch that only older TensorRT takes.
LEGACY_BRANCH_USES = {
    "ICudaEngine.device_memory_size": "DeviceMemoryApi(v2=False), taken only below TensorRT 10.1",
}

# Calls the inference must reach; each is an essential step of the build or the runtime.
EXPECTED_USES = {
    "tensorrt.Builder", "tensorrt.OnnxParser", "tensorrt.Runtime", "tensorrt.Logger", "tensorrt.__version__",
    "tensorrt.nptype", "Logger.WARNING", "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "MemoryPoolType.WORKSPACE", "ExecutionContextAllocationStrategy.USER_MANAGED", "TensorIOMode.INPUT",
    "Builder.create_network", "Builder.create_builder_config", "Builder.create_optimization_profile",
    "Builder.build_serialized_network", "OnnxParser.parse_from_file", "OnnxParser.num_errors",
    "OnnxParser.get_error", "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.builder_optimization_level",
    "IBuilderConfig.add_optimization_profile", "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache", "IOptimizationProfile.set_shape", "ITimingCache.serialize",
    "IHostMemory.nbytes", "Runtime.deserialize_cuda_engine", "ICudaEngine.create_execution_context",
    "ICudaEngine.device_memory_size_v2", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype", "IExecutionContext.set_device_memory",
    "IExecutionContext.device_memory", "IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3", "IExecutionContext.get_tensor_shape", "BuilderFlag.TF32",
    "IBuilderConfig.clear_flag", "BuilderFlag.REFIT", "IBuilderConfig.set_flag", "tensorrt.Refitter",
    "tensorrt.Weights", "ICudaEngine.refittable", "Refitter.get_all_weights", "Refitter.set_named_weights",
    "Refitter.get_missing_weights", "Refitter.refit_cuda_engine",
    "tensorrt.IProfiler", "IProfiler.__init__", "IExecutionContext.profiler",  # sdrun --profile's layer times
}


# ---------------------------------------------------------------------------------------------
# The stubs, read leniently


@dataclasses.dataclass(frozen=True)
class Member:
    kind: str  # "method" | "attribute" | "class"
    type: str | None  # class name of an attribute's value or a method's result, when the stub says


@dataclasses.dataclass
class StubClass:
    name: str  # dotted for nested classes: "ILogger.Severity"
    bases: list[str]
    members: dict[str, Member] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StubApi:
    version: str
    module_names: frozenset
    classes: dict  # name -> StubClass

    def lookup(self, cls: str, name: str, seen: frozenset = frozenset()) -> Member | None:
        stub = self.classes.get(cls)
        if stub is None or cls in seen:
            return None
        if name in stub.members:
            return stub.members[name]
        for base in stub.bases:
            found = self.lookup(self.resolve(base, cls), name, seen | {cls})
            if found:
                return found
        return None

    def resolve(self, type_text: str | None, context: str = "") -> str | None:
        """A class name from annotation text: 'ILogger.Severity', 'typing.ClassVar[Dims]', 'tensorrt.X'."""
        if not type_text:
            return None
        inner = re.fullmatch(r"typing\.ClassVar\[(.+)\]", type_text.strip())
        text = (inner.group(1) if inner else type_text).strip().strip("'\"")
        text = re.sub(r"^(tensorrt_bindings\.)?tensorrt\.", "", text)
        for candidate in (text, f"{context}.{text}" if context else None):
            if candidate in self.classes:
                return candidate
        return None


CLASS_LINE = re.compile(r"^(\s*)class (\w+)(?:\((.*)\))?\s*:")
DEF_LINE = re.compile(r"^(\s*)def (\w+)\s*\(.*?(?:->\s*(.+?))?:\s*$")
ATTRIBUTE_LINE = re.compile(r"^(\s*)(\w+)\s*:\s*([^=#]+?)\s*(?:=.*)?(?:#.*)?$")
IVAR = re.compile(r":ivar (\w+):(?:\s*:class:`([\w.]+)`)?")


def parse_bindings(text: str) -> dict[str, StubClass]:
    """Classes of `tensorrt_bindings/tensorrt.pyi`, by indentation; docstrings only give `:ivar`s."""
    classes: dict[str, StubClass] = {}
    stack: list[tuple[int, StubClass]] = []
    in_docstring = False
    for line in text.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if in_docstring or line.count('"""') % 2:
            in_docstring ^= line.count('"""') % 2 == 1
            for name, type_name in IVAR.findall(line):
                if stack:
                    stack[-1][1].members.setdefault(name, Member("attribute", type_name or None))
            continue
        while stack and indent <= stack[-1][0]:
            stack.pop()
        owner = stack[-1][1] if stack and indent == stack[-1][0] + 4 else None
        if match := CLASS_LINE.match(line):
            name = f"{stack[-1][1].name}.{match.group(2)}" if owner else match.group(2)
            bases = [b.strip() for b in (match.group(3) or "").split(",") if b.strip()]
            classes[name] = StubClass(name, bases)
            if owner:
                owner.members[match.group(2)] = Member("class", name)
            stack.append((indent, classes[name]))
        elif owner and (match := DEF_LINE.match(line)):
            owner.members.setdefault(match.group(2), Member("method", match.group(3)))
        elif owner and (match := ATTRIBUTE_LINE.match(line)):
            owner.members.setdefault(match.group(2), Member("attribute", match.group(3)))
    return classes


def parse_module_names(text: str) -> set[str]:
    """Names `tensorrt/__init__.pyi` exports: imports, annotated globals, `__all__`."""
    names = set(re.findall(r"^from \S+ import (\w+)", text, re.M))
    names |= set(re.findall(r"^import \S+ as (\w+)", text, re.M))
    names |= set(re.findall(r"^(\w+)\s*:", text, re.M))
    for block in re.findall(r"^__all__\s*=\s*\[(.*?)\]", text, re.M | re.S):
        names |= set(re.findall(r"'(\w+)'", block))
    return names


def unpacked_stub_files(root: Path) -> tuple[str, Path, Path]:
    """(version, module stub, bindings stub) of a tensorrt-stubs wheel unpacked at `root`."""
    (info,) = root.glob(f"{STUBS.replace('-', '_')}-*.dist-info")
    version = info.name[len(STUBS) + 1:-len(".dist-info")]
    return version, root / "tensorrt/__init__.pyi", root / "tensorrt_bindings/tensorrt.pyi"


def stub_files() -> tuple[str, Path, Path]:
    if os.environ.get(STUBS_OVERRIDE):
        return unpacked_stub_files(Path(os.environ[STUBS_OVERRIDE]))
    try:
        distribution = importlib.metadata.distribution(STUBS)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the TensorRT API check needs the {STUBS} package; install it with: {STUBS_INSTALL}")
    files = {str(f): Path(distribution.locate_file(f)) for f in distribution.files or ()}
    module, bindings = files.get("tensorrt/__init__.pyi"), files.get("tensorrt_bindings/tensorrt.pyi")
    if not (module and bindings and module.is_file() and bindings.is_file()):
        pytest.fail(f"{STUBS} {distribution.version} lacks tensorrt/__init__.pyi or tensorrt_bindings/tensorrt.pyi; "
                    f"reinstall it with: {STUBS_INSTALL}")
    return distribution.version, module, bindings


def load_stub_api() -> StubApi:
    version, module, bindings = stub_files()
    classes = parse_bindings(bindings.read_text())
    return StubApi(version, frozenset(parse_module_names(module.read_text())), classes)


# ---------------------------------------------------------------------------------------------
# Our code, walked


@dataclasses.dataclass(frozen=True)
class ApiUse:
    owner: str  # "tensorrt" for the module, else the class
    name: str
    found: bool
    where: str  # file:line

    @property
    def qualified(self) -> str:
        return f"{self.owner}.{self.name}"


class TypeChecker:
    """Types are tuples: ("module",), ("class", C), ("instance", C), ("method", C, name), ("tuple", [types])."""

    def __init__(self, api: StubApi, tree: ast.Module):
        self.api = api
        self.returns = {f.name: self.annotation(f.returns) for f in ast.walk(tree)
                        if isinstance(f, ast.FunctionDef) and f.returns is not None}

    def annotation(self, node) -> tuple | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self.annotation(ast.parse(node.value, mode="eval").body)
        if isinstance(node, ast.BinOp):  # X | None
            return self.annotation(node.left) or self.annotation(node.right)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "tuple":
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return ("tuple", [self.annotation(item) for item in items])
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            return ("instance", node.attr)
        return None

    def typeof(self, node, env: dict) -> tuple | None:
        if isinstance(node, ast.Name):
            return ("module",) if node.id == "trt" else env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                return env.get(f"self.{node.attr}")
            return self.member_type(self.typeof(node.value, env), node.attr)
        if isinstance(node, ast.Call):
            func = self.typeof(node.func, env)
            if func and func[0] == "class":
                return ("instance", func[1])
            if func and func[0] == "method":
                member = self.api.lookup(func[1], func[2])
                resolved = self.api.resolve(member.type if member else None, func[1])
                return ("instance", resolved) if resolved else None
            if isinstance(node.func, ast.Name):
                return self.returns.get(node.func.id)
        return None

    def member_type(self, receiver: tuple | None, name: str) -> tuple | None:
        if receiver is None:
            return None
        if receiver[0] == "module":
            return ("class", name) if name in self.api.classes else None
        if receiver[0] not in ("class", "instance"):
            return None
        member = self.api.lookup(receiver[1], name)
        if member is None:
            return None
        if member.kind == "class":
            return ("class", member.type)
        if member.kind == "method":
            return ("method", receiver[1], name)
        resolved = self.api.resolve(member.type, receiver[1])
        return ("instance", resolved) if resolved else None

    def use(self, node: ast.Attribute, env: dict, filename: str) -> ApiUse | None:
        receiver = self.typeof(node.value, env)
        where = f"{filename}:{node.lineno}"
        if receiver == ("module",):
            return ApiUse("tensorrt", node.attr, node.attr in self.api.module_names, where)
        if receiver and receiver[0] in ("class", "instance"):
            return ApiUse(receiver[1], node.attr, self.api.lookup(receiver[1], node.attr) is not None, where)
        return None

    def bind(self, targets: list, value, env: dict) -> None:
        """Record the types an assignment gives its Name and `self.attr` targets (tuples pairwise)."""
        for target in targets:
            if isinstance(target, ast.Tuple):
                if isinstance(value, ast.Tuple):
                    for item, item_value in zip(target.elts, value.elts):
                        self.bind([item], item_value, env)
                    continue
                typed = self.typeof(value, env)
                if typed and typed[0] == "tuple":
                    for item, item_type in zip(target.elts, typed[1]):
                        self._set(item, item_type, env)
                continue
            self._set(target, self.typeof(value, env), env)

    def _set(self, target, typed: tuple | None, env: dict) -> None:
        if typed is None:
            return
        if isinstance(target, ast.Name):
            env[target.id] = typed
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            env[f"self.{target.attr}"] = typed

    def function_env(self, function: ast.FunctionDef, inherited: dict) -> dict:
        env = dict(inherited)
        arguments = function.args
        for argument in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
            if argument.annotation is not None and (typed := self.annotation(argument.annotation)):
                env[argument.arg] = typed
        for _ in range(2):  # assignments may appear before the ones they depend on
            for node in ast.walk(function):
                if isinstance(node, ast.Assign):
                    self.bind(node.targets, node.value, env)
                elif isinstance(node, ast.AnnAssign):
                    typed = self.annotation(node.annotation) or (self.typeof(node.value, env) if node.value else None)
                    self._set(node.target, typed, env)
        return env


def api_uses(source: str, filename: str, api: StubApi) -> list[ApiUse]:
    """Every TensorRT name `source` reads, with whether the stubs publish it."""
    tree = ast.parse(source)
    checker = TypeChecker(api, tree)
    uses = []
    for scope, functions in _scopes(tree):
        shared = {}
        for function in functions:  # a class's `self.attr` types, gathered from all its methods
            shared.update({k: v for k, v in checker.function_env(function, {}).items() if k.startswith("self.")})
        for function in functions:
            env = checker.function_env(function, shared)
            uses += [u for node in ast.walk(function) if isinstance(node, ast.Attribute)
                     if (u := checker.use(node, env, filename))]
    module_env: dict = {}
    for statement in tree.body:
        if not isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
            uses += [u for node in ast.walk(statement) if isinstance(node, ast.Attribute)
                     if (u := checker.use(node, module_env, filename))]
    return uses


def _scopes(tree: ast.Module):
    """(class or None, its functions): module functions one by one, each class's methods together."""
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef):
            yield None, [statement]
        elif isinstance(statement, ast.ClassDef):
            yield statement, [f for f in statement.body if isinstance(f, ast.FunctionDef)]


def unpublished(uses: list[ApiUse]) -> list[str]:
    return sorted({f"{u.qualified} ({u.where})" for u in uses
                   if not u.found and u.qualified not in TENSORRT_11_ADDITIONS})


def removed_in_tensorrt_11(uses: list[ApiUse]) -> list[str]:
    return sorted({f"{u.qualified} ({u.where})" for u in uses
                   if u.qualified in REMOVED_IN_TENSORRT_11 and u.qualified not in LEGACY_BRANCH_USES})


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def api() -> StubApi:
    return load_stub_api()


@pytest.fixture(scope="module")
def our_uses(api) -> list[ApiUse]:
    uses = []
    for relative in CHECKED_FILES:
        path = ROOT / relative
        uses += api_uses(path.read_text(), relative, api)
    return uses


def test_tensorrt_stubs_are_installed():
    version, _, _ = stub_files()
    if os.environ.get(STUBS_OVERRIDE):
        assert tuple(int(p) for p in version.split(".")[:2]) >= MIN_TENSORRT
    else:
        assert version.startswith("10.13."), f"expected {STUBS} 10.13.x ({STUBS_INSTALL}), got {version}"


def test_stubs_are_read_leniently(api):
    assert {"Builder", "ICudaEngine", "IExecutionContext", "ILogger.Severity"} <= set(api.classes)
    assert api.lookup("Logger", "WARNING") is not None  # inherited from ILogger
    assert api.lookup("IExecutionContext", "device_memory") is not None  # only in the docstring's :ivar


def test_every_tensorrt_name_we_use_is_published(our_uses):
    missing = unpublished(our_uses)
    version, _, _ = stub_files()
    assert not missing, (f"TensorRT names not in the {version} API (misspelled, removed, or new: add new ones "
                         "to TENSORRT_11_ADDITIONS with the reason):\n  " + "\n  ".join(missing))


def test_no_name_removed_in_tensorrt_11_outside_a_legacy_branch(our_uses):
    removed = removed_in_tensorrt_11(our_uses)
    assert not removed, "names TensorRT 11 removed:\n  " + "\n  ".join(removed)


def test_inference_reaches_every_essential_call(our_uses):
    found = {u.qualified for u in our_uses}
    dark = sorted(EXPECTED_USES - found)
    assert not dark, ("the checker no longer sees these calls (annotate the TensorRT object with trt.X):\n  "
                      + "\n  ".join(dark))


def test_only_trt_names_the_module():
    for relative in CHECKED_FILES:
        tree = ast.parse((ROOT / relative).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.asname == "trt" for a in node.names if a.name == "tensorrt"), relative
            if isinstance(node, ast.ImportFrom):
                assert node.module != "tensorrt", f"{relative}: use `import tensorrt as trt`"


MISSPELLED = '''
def build(trt, logger, network, config: trt.IBuilderConfig):
    plan = trt.Builder(logger).build_serialized_netwrk(network, config)
    config.set_flag(trt.BuilderFlag.FP17)
    return plan
'''

REMOVED = '''
def old_style(engine: "trt.ICudaEngine", context: trt.IExecutionContext | None, trt):
    shape = engine.get_binding_shape(0)
    context.execute_async_v2([], 0)
    return trt.BuilderFlag.FP16, trt.volume(shape)
'''

THROUGH_RESULTS = '''
def chain(trt, logger):
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limt(trt.MemoryPoolType.WORKSPACE, 1)
    network, parser = make(trt, builder)
    parser.parse_from_fle("x.onnx")

def make(trt, builder: trt.Builder) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    return builder.create_network(0), None

class Runner:
    def __init__(self, context: trt.IExecutionContext):
        self.context = context

    def run(self):
        self.context.execute_async_v4(0)
'''


def test_misspelled_names_are_reported(api):
    missing = unpublished(api_uses(MISSPELLED, "snippet.py", api))
    assert any("Builder.build_serialized_netwrk" in m for m in missing)
    assert any("BuilderFlag.FP17" in m for m in missing)
    assert not any("set_flag" in m or "tensorrt.Builder " in m for m in missing)


def test_removed_names_are_reported(api):
    uses = api_uses(REMOVED, "snippet.py", api)
    missing = unpublished(uses)
    assert any("ICudaEngine.get_binding_shape" in m for m in missing)  # gone since TensorRT 10.0
    assert any("IExecutionContext.execute_async_v2" in m for m in missing)
    assert any("BuilderFlag.FP16" in m for m in removed_in_tensorrt_11(uses))
    assert not any("volume" in m for m in missing)


def test_types_flow_through_calls_tuples_and_self(api):
    missing = unpublished(api_uses(THROUGH_RESULTS, "snippet.py", api))
    assert any("IBuilderConfig.set_memory_pool_limt" in m for m in missing)
    assert any("OnnxParser.parse_from_fle" in m for m in missing)
    assert any("IExecutionContext.execute_async_v4" in m for m in missing)
    assert len(missing) == 3, missing


# ---------------------------------------------------------------------------------------------
# CUDA names: checked against the installed cuda-bindings, which imports without a GPU
#
# The CUDA runtime module is `self.rt` in `Cuda` (`cuda.rt` / `self.cuda.rt` where a `Cuda` is held), or a
# name bound to it (`cudart`) or to one of its
# members (`attribute = self.rt.cudaDeviceAttr`); the driver library is a name bound to
# `ctypes.CDLL(...)`. Every attribute read on them must exist in `cuda.bindings.runtime` / `.driver`,
# and every runtime call must pass as many arguments as the binding takes.

CUDA_CHECKED_FILES = ("runtime/backends/cuda.py", "runtime/backends/cuda_stack.py", "runtime/backends/tensorrt_loop.py")
CUDA_INSTALL = ".venv/bin/pip install 'cuda-bindings>=13,<14'   (or >=12.8,<13 on a CUDA-12 driver)"
CUDART_NAMES = {"cudart"}

EXPECTED_CUDA_USES = {
    "runtime.cudaError_t.cudaSuccess", "runtime.cudaGetDeviceCount", "runtime.cudaDriverGetVersion",
    "runtime.cudaGetDevice", "runtime.cudaDeviceGetAttribute",
    "runtime.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor",
    "runtime.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor", "runtime.cudaGetDeviceProperties",
    "runtime.cudaMemGetInfo", "runtime.cudaMalloc", "runtime.cudaFree", "runtime.cudaMallocHost",
    "runtime.cudaFreeHost", "runtime.cudaStreamCreateWithFlags", "runtime.cudaStreamNonBlocking",
    "runtime.cudaStreamGetFlags", "runtime.cudaStreamDestroy", "runtime.cudaMemcpyAsync",
    "runtime.cudaMemcpyKind.cudaMemcpyHostToDevice", "runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost",
    "runtime.cudaStreamSynchronize", "driver.cuDriverGetVersion", "driver.cuInit", "driver.cuDeviceGetCount",
    # the device-resident loop (tensorrt_loop.py): graph capture and replay, device-to-device row copies
    "runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice", "runtime.cudaStreamBeginCapture",
    "runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal", "runtime.cudaStreamEndCapture",
    "runtime.cudaGraphInstantiate", "runtime.cudaGraphLaunch", "runtime.cudaGraphExecDestroy",
    "runtime.cudaGraphDestroy",
}


@dataclasses.dataclass(frozen=True)
class CudaUse:
    path: tuple[str, ...]  # ("runtime", "cudaMemcpyKind", "cudaMemcpyHostToDevice")
    problem: str | None  # None: published, and called with as many arguments as it takes
    where: str

    @property
    def qualified(self) -> str:
        return ".".join(self.path)


def cuda_modules() -> dict:
    try:
        from cuda.bindings import driver, runtime
    except ImportError:
        pytest.fail(f"the CUDA name check needs cuda-bindings; install it with: {CUDA_INSTALL}")
    return {"runtime": runtime, "driver": driver}


def cuda_path(node, env: dict) -> tuple[str, ...] | None:
    """The CUDA module path an expression denotes, or None."""
    if isinstance(node, ast.Name):
        return ("runtime",) if node.id in CUDART_NAMES else env.get(node.id)
    if isinstance(node, ast.Attribute):
        if node.attr == "rt" and _holds_cuda(node.value):
            return ("runtime",)
        parent = cuda_path(node.value, env)
        return (*parent, node.attr) if parent else None
    return None


def _holds_cuda(node) -> bool:
    """`self` (inside `Cuda`), a name `cuda`, or an attribute `….cuda`: the holders of a `Cuda` wrapper."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cuda")
    return isinstance(node, ast.Attribute) and node.attr == "cuda"


def cuda_env(function: ast.FunctionDef) -> dict:
    env = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value, name = node.value, node.targets[0].id
            if isinstance(value, ast.Call) and ast.unparse(value.func) == "ctypes.CDLL":
                env[name] = ("driver",)
            elif (path := cuda_path(value, env)) is not None:
                env[name] = path
    return env


def resolve_cuda(path: tuple[str, ...], modules: dict):
    found = modules[path[0]]
    for name in path[1:]:
        found = getattr(found, name, None)
        if found is None:
            return None
    return found


def arity_problem(target, call: ast.Call) -> str | None:
    """A runtime binding called with another number of positional arguments than it takes."""
    import inspect

    if any(isinstance(a, ast.Starred) for a in call.args) or call.keywords:
        return None
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if len(parameters) != len(call.args):
        return f"takes {len(parameters)} argument(s), called with {len(call.args)}"
    return None


def cuda_uses(source: str, filename: str, modules: dict) -> list[CudaUse]:
    """Every CUDA name `source` reads, with what is wrong with it (None: nothing)."""
    tree = ast.parse(source)
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    uses = []
    for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        env = cuda_env(function)
        for node in ast.walk(function):
            if not isinstance(node, ast.Attribute) or cuda_path(node.value, env) is None:
                continue
            path = cuda_path(node, env)
            target = resolve_cuda(path, modules)
            problem = "not published" if target is None else None
            if target is not None and id(node) in calls and path[0] == "runtime":
                problem = arity_problem(target, calls[id(node)])
            uses.append(CudaUse(path, problem, f"{filename}:{node.lineno}"))
    return uses


@pytest.fixture(scope="module")
def our_cuda_uses() -> list[CudaUse]:
    modules = cuda_modules()
    return [use for relative in CUDA_CHECKED_FILES
            for use in cuda_uses((ROOT / relative).read_text(), relative, modules)]


def test_every_cuda_name_we_use_is_published_and_called_right(our_cuda_uses):
    wrong = sorted({f"{u.qualified}: {u.problem} ({u.where})" for u in our_cuda_uses if u.problem})
    assert not wrong, "CUDA names not in the installed cuda-bindings, or called wrongly:\n  " + "\n  ".join(wrong)


def test_cuda_inference_reaches_every_essential_call(our_cuda_uses):
    dark = sorted(EXPECTED_CUDA_USES - {u.qualified for u in our_cuda_uses})
    assert not dark, "the CUDA check no longer sees these names:\n  " + "\n  ".join(dark)


CUDA_MISTAKES = '''
import ctypes

class Cuda:
    def run(self, pointer, stream):
        self.rt.cudaMemcpyAsync(pointer, 0, 16, stream)
        kind = self.rt.cudaMemcpyKind
        return kind.cudaMemcpyHostToDevic, self.rt.cudaMallocHost(16, 0)

def driver():
    lib = ctypes.CDLL("libcuda.so.1")
    return lib.cuDriverVersion(None), lib.cuInit(0)
'''


def test_cuda_mistakes_are_reported():
    problems = {u.qualified: u.problem for u in cuda_uses(CUDA_MISTAKES, "snippet.py", cuda_modules())}
    assert problems["runtime.cudaMemcpyAsync"] == "takes 5 argument(s), called with 4"
    assert problems["runtime.cudaMemcpyKind.cudaMemcpyHostToDevic"] == "not published"
    assert problems["runtime.cudaMallocHost"] == "takes 1 argument(s), called with 2"
    assert problems["driver.cuDriverVersion"] == "not published" and problems["driver.cuInit"] is None
