"""Every metric the APR server exports: the single source of truth for their names.

Prometheus naming: base units (`_seconds`), `_total` for counters. The Grafana dashboard and
the alert rules of the Helm chart query these names; a test checks that they exist.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Solves take seconds (a parent plus rounds of children); the buckets reach two minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
                   120.0)
ENGINE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
CHILDREN_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

REQUEST_DURATION = "apr_request_duration_seconds"
ENGINE_CALL_DURATION = "apr_engine_call_duration_seconds"
CHILDREN = "apr_children_per_request"
REQUEST_TOKENS = "apr_request_tokens"
GENERATED_TOKENS = "apr_generated_tokens_total"
IN_FLIGHT = "apr_requests_in_flight"
REQUESTS = "apr_requests_total"
ERRORS = "apr_errors_total"
BUILD_INFO = "apr_build_info"
ENGINE_UP = "apr_engine_up"

ALL = (REQUEST_DURATION, ENGINE_CALL_DURATION, CHILDREN, REQUEST_TOKENS, GENERATED_TOKENS,
       IN_FLIGHT, REQUESTS, ERRORS, BUILD_INFO, ENGINE_UP)


class Metrics:
    """The server's collectors, on their own registry (so tests can make many servers)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            REQUEST_DURATION, "Wall time of a solve request, from arrival to answer.",
            ["mode", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.engine_call_duration = Histogram(
            ENGINE_CALL_DURATION, "Wall time of one engine call (a parent segment or a batch "
            "of children).", ["role"], buckets=ENGINE_BUCKETS, registry=r)
        self.children = Histogram(CHILDREN, "Child threads spawned by one request.",
                                  buckets=CHILDREN_BUCKETS, registry=r)
        self.request_tokens = Histogram(
            REQUEST_TOKENS, "Tokens of one request: total (every context, counted once) and "
            "sequential (the critical path).", ["kind"], buckets=TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Counter(GENERATED_TOKENS.removesuffix("_total"),
                                        "Tokens the model generated.", registry=r)
        self.in_flight = Gauge(IN_FLIGHT, "Solve requests being served now.", registry=r)
        self.requests = Counter(REQUESTS.removesuffix("_total"),
                                "Solve requests answered, by outcome.", ["mode", "outcome"],
                                registry=r)
        self.errors = Counter(ERRORS.removesuffix("_total"), "Failed requests, by kind.", ["kind"],
                              registry=r)
        self.build_info = Gauge(BUILD_INFO, "Build information (always 1).",
                                ["version", "engine"], registry=r)
        self.engine_up = Gauge(ENGINE_UP, "Whether the engine answered its last readiness check.",
                               registry=r)
