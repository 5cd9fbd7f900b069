"""Graph cleanup: dead-node removal and ordering, constant folding, shape inference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs

from sdcompile.graph.pass_result import PassResult, model_from_graph
from sdcompile.graph.shape_inference import with_inferred_shapes
from sdcompile.graph.surgery import copy_graph

if TYPE_CHECKING:
    from sdcompile.passes import PassOptions

# Folded tensors above this size stay computed at run time (Expand/Tile of a constant would
# otherwise bloat the file).
DEFAULT_FOLD_SIZE_THRESHOLD_BYTES = 64 << 20


@dataclass(frozen=True)
class CleanupOptions:
    fold_size_threshold_bytes: int | None = None  # None: DEFAULT_FOLD_SIZE_THRESHOLD_BYTES


@dataclass(frozen=True)
class CleanupReport:
    nodes_before: int
    nodes_after: int


def cleanup(graph: gs.Graph, options: CleanupOptions | None = None) -> gs.Graph:
    """Remove dead nodes, fold constant subgraphs (with ONNX Runtime, partition by partition so
    one unfoldable node does not block the rest), and infer every tensor's type and shape."""
    options = options or CleanupOptions()
    threshold = (DEFAULT_FOLD_SIZE_THRESHOLD_BYTES if options.fold_size_threshold_bytes is None
                 else options.fold_size_threshold_bytes)
    g = copy_graph(graph)
    g.cleanup().toposort()
    g = with_inferred_shapes(g)
    g.fold_constants(partitioning="basic", size_threshold=threshold)
    g.cleanup().toposort()
    return with_inferred_shapes(g)


def run(model: onnx.ModelProto, options: PassOptions) -> PassResult:
    graph = gs.import_onnx(model)
    cleaned = cleanup(graph, options.cleanup)
    report = CleanupReport(nodes_before=len(graph.nodes), nodes_after=len(cleaned.nodes))
    return PassResult(model_from_graph(cleaned, model), report)
