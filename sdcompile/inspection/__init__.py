"""`sdcompile inspect` and the graph facts behind it: what a bundle or an ONNX file contains
(artifacts), a plain-data graph summary (summary), and where a graph computes in fp16 or fp32
(fp16_audit)."""
from sdcompile.inspection.artifacts import format_summary, inspect_path

__all__ = ["format_summary", "inspect_path"]
