"""Accuracy and latency harness: every backend against eager PyTorch, and diffusers as the peer (`make bench`)."""
