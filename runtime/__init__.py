"""sdrun: the lightweight Stable Diffusion runtime (numpy + ONNX Runtime or TensorRT; no torch)."""

__version__ = "0.1.0"
