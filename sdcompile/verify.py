"""Export verification: every exported graph runs on ONNX Runtime CPU against eager PyTorch.

The gates (statistic and threshold per output and precision) are `sdrun.gates.output_gate`'s; an
output that fails its gate stops the export with the value it reached.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdcompile.options import Precision
from sdrun.errors import UserError
from sdrun.gates import check_output


def verify_graph(name: str, module: torch.nn.Module, inputs: dict, graph: Path, precision: Precision,
                 log) -> list[dict]:
    """Gate every output of `graph` on `inputs` against `module`; returns the verdicts as plain data."""
    import onnxruntime as ort

    with torch.no_grad():
        reference = module(*inputs.values())
    references = reference if isinstance(reference, tuple) else (reference,)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    verdicts = []
    for value, expected, actual in zip(session.get_outputs(), references, outputs):
        verdict = check_output(value.name, value.name, expected.numpy(), actual, precision.value)
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
