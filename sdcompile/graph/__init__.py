"""ONNX graph helpers the passes share: surgery, dtypes, shape inference, constant evaluation,
opset upgrades, attention matching, the fp16 islands policy, and the pass result type."""
