"""Adaptive Parallel Reasoning on Kubernetes: Countdown data, training, spawn/join decoding."""

__version__ = "0.1.0"
