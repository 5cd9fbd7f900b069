"""Export verification: every exported graph runs on ONNX Runtime CPU against eager PyTorch.

The gates (statistic and threshold per output and precision) are `sdrun.gates.output_gate`'s; an
output that fails its gate stops the export with the value it reached.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdcompile.graph.partition import cpu_session, run_in_parts
from sdcompile.options import Precision
from sdrun.errors import UserError
from sdrun.gates import check_output

VERIFY_PART_BYTES = 512 * 1024**2  # weights per verification session: an fp16 part peaks near 3x this on CPU


def eager_outputs(module: torch.nn.Module, inputs: dict) -> tuple[np.ndarray, ...]:
    """`module`'s outputs on `inputs`, kept as numpy so the module can be freed before the graph is run."""
    with torch.no_grad():
        outputs = module(*inputs.values())
    return tuple(o.numpy() for o in (outputs if isinstance(outputs, tuple) else (outputs,)))


def verify_graph(name: str, references: tuple[np.ndarray, ...], inputs: dict, graph: Path, precision: Precision,
                 log) -> list[dict]:
    """Gate every output of `graph` on `inputs` against the eager `references`; returns the verdicts as plain
    data. The sessions share no memory with an eager model: the caller has freed it. `graph` is best in
    external-data form, which ONNX Runtime maps instead of parsing into memory; it runs in parts of at most
    `VERIFY_PART_BYTES` of weights each (`graph.partition`)."""
    outputs = run_in_parts(graph, {k: v.numpy() for k, v in inputs.items()}, VERIFY_PART_BYTES, cpu_session)
    verdicts = []
    for (value, actual), expected in zip(outputs.items(), references):
        verdict = check_output(value, value, expected, actual, precision.value)
        log(f"[{name}] gate {verdict.describe()}")
        if not verdict.passed:
            raise _failed(name, verdict, precision)
        verdicts.append(verdict.to_dict())
    return verdicts


def _failed(name: str, verdict, precision: Precision) -> UserError:
    statistic = verdict.gate.statistic
    return UserError(f"{name}: the exported graph does not reproduce eager PyTorch.",
                     expected=f"{statistic.value} {statistic.relation} {verdict.gate.threshold:g}",
                     got=f"{statistic.value} = {verdict.value:.6g} ({verdict.statistics})",
                     fix="export in fp32, or keep more nodes in fp32 (fp16 islands)"
                     if precision is Precision.FP16 else "report this graph; export with --no-verify to inspect it")
