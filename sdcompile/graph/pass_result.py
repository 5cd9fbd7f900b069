"""What a graph pass returns: the new model and the pass's own report."""
from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class PassResult:
    """The result of a pass's `run(model, options)`; the input model is left as it was."""

    model: onnx.ModelProto
    report: object  # the pass's frozen report dataclass (plain data via `reports.plain_data`)


@dataclass(frozen=True)
class GraphResult:
    """The same for a pass's graph-level rewrite, on an onnx-graphsurgeon graph."""

    graph: gs.Graph
    report: object


def model_from_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """`graph` as a model with `like`'s doc string and metadata, which graphsurgeon drops."""
    model = gs.export_onnx(graph)
    model.doc_string = like.doc_string
    model.metadata_props.extend(like.metadata_props)
    return model
