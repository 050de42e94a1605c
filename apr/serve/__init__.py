"""The APR inference server: the spawn/join loop behind an HTTP API, with Prometheus metrics."""
