"""sdcompile: compile Stable Diffusion checkpoints into verified ONNX graphs and TensorRT engines."""

__version__ = "0.1.0"
