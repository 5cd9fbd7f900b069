"""The pipeline behind Triton Inference Server: the request contract, decoding and batching of requests,
the PyTriton binding (`sdrun serve`) and the client (`sdrun txt2img --server`)."""
