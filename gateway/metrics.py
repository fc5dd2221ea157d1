"""Prometheus metrics per route: requests by HTTP status and gRPC code, latencies, body sizes.

Labels are bounded: the route's template (never the raw path), ``unmatched`` for everything
else, status numbers and code names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

UNMATCHED = "unmatched"
_SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cipherfeed_gateway_requests",
            "HTTP requests handled, by route, HTTP status and gRPC code",
            ("route", "status", "grpc_code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "cipherfeed_gateway_request_duration_seconds",
            "Time from the request's first byte to the response, by route",
            ("route",),
            buckets=_TIME_BUCKETS,
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "cipherfeed_gateway_upstream_duration_seconds",
            "Time of the upstream gRPC call, by route",
            ("route",),
            buckets=_TIME_BUCKETS,
            registry=self.registry,
        )
        self.request_bytes = Histogram(
            "cipherfeed_gateway_request_bytes",
            "Request body sizes, by route",
            ("route",),
            buckets=_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.response_bytes = Histogram(
            "cipherfeed_gateway_response_bytes",
            "Response body sizes, by route",
            ("route",),
            buckets=_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.receiving = Gauge(
            "cipherfeed_gateway_requests_receiving",
            "Requests whose body is still arriving",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cipherfeed_gateway_requests_in_flight",
            "Requests whose body arrived, being handled now",
            registry=self.registry,
        )

    def observe(
        self, route: str, status: int, grpc_code: str, seconds: float, request_bytes: int, response_bytes: int
    ) -> None:
        self.requests.labels(route, str(status), grpc_code).inc()
        self.latency.labels(route).observe(seconds)
        self.request_bytes.labels(route).observe(request_bytes)
        self.response_bytes.labels(route).observe(response_bytes)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
