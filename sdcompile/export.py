"""The one place that calls `torch.onnx.export` (torch's default dynamo exporter)."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from sdcompile.graph.external import load_structure
from sdcompile.options import DEFAULT_OPSET
from sdrun.bundle import TensorSpec
from sdrun.errors import UserError

MIN_OPSET = 18  # torchlib's native opset; lower ones need version conversion that fails on these graphs


def trace_to_file(module: torch.nn.Module, inputs: dict[str, torch.Tensor], input_specs: tuple[TensorSpec, ...],
                  output_specs: tuple[TensorSpec, ...], dim_multiples: dict[str, int], path: Path,
                  opset: int = DEFAULT_OPSET) -> None:
    """Trace `module(*inputs)` into ONNX at `path` (weights in an external-data file beside it), with the
    spec's names and symbolic dims.

    The exporter's initializers are the module's own parameter tensors and are written to disk one by
    one, so tracing holds no second copy of the weights. `dim_multiples` declares symbols that only take
    multiples of a number (e.g. latent sizes divisible by 2^levels), so the exporter can prove
    down/up-sampled sizes line up.
    """
    if opset < MIN_OPSET:
        raise UserError(f"opset {opset} is too low for the exporter.", expected=f">= {MIN_OPSET}",
                        got=str(opset), fix=f"pass --opset {DEFAULT_OPSET} (default)")
    args = tuple(inputs[t.name] for t in input_specs)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), args, dynamo=True, opset_version=opset,
            input_names=[t.name for t in input_specs], output_names=[t.name for t in output_specs],
            dynamic_shapes=_dynamic_shapes(module, input_specs, dim_multiples), optimize=True, verbose=False)
        program.save(str(path), external_data=True)
        del program
    forget_rewriter_matches()
    model = load_structure(path)
    name_io_dims(model, input_specs, output_specs)
    onnx.save_model(model, str(path))  # the structure only: the data file stays as written


def forget_rewriter_matches() -> None:
    """Drop what onnxscript's pattern matchers remember of their last match.

    The exporter's optimizer leaves each module-level rewrite rule holding the graph it last looked at,
    and that graph's initializers are the traced module's parameters: without this, a model's weights
    stay alive after its export until the next export replaces them.
    """
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        matchers = [o for o in gc.get_objects() if isinstance(o, SimplePatternMatcher)]
    for matcher in matchers:
        for attribute in ("_graph", "_current_node", "_tracer", "_match"):
            if hasattr(matcher, attribute):
                setattr(matcher, attribute, None)


def _dynamic_shapes(module: torch.nn.Module, specs: tuple[TensorSpec, ...], multiples: dict[str, int]) -> dict:
    """forward-argument name -> {axis: Dim}; one Dim per symbol, shared by every input using it."""
    import inspect

    dims = {}
    for symbol in {d for spec in specs for d in spec.dims if isinstance(d, str)}:
        step = multiples.get(symbol, 1)
        base = torch.export.Dim(f"{symbol}_{step}" if step > 1 else symbol, min=1)
        dims[symbol] = base * step if step > 1 else base
    params = list(inspect.signature(module.forward).parameters)
    return {param: {axis: dims[d] for axis, d in enumerate(spec.dims) if isinstance(d, str)} or None
            for param, spec in zip(params, specs)}


def name_io_dims(model: onnx.ModelProto, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Give graph I/O dims the manifest's symbol names (the exporter invents its own)."""
    specs = {t.name: t for t in (*inputs, *outputs)}
    for value in (*model.graph.input, *model.graph.output):
        spec = specs[value.name]
        dims = value.type.tensor_type.shape.dim
        for dim, symbol in zip(dims, spec.dims):
            if isinstance(symbol, str):
                dim.dim_param = symbol
            else:
                dim.dim_value = symbol
