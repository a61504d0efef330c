"""The gateway's Prometheus metrics, served at /metrics.

Counters and histograms are updated on the request path (a few hundred nanoseconds each);
breaker states, limit rejections and budget utilization are read from the gateway when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("corral_gateway_requests", "Model calls by model and outcome",
                                ["model", "status"], registry=registry)
        self.in_flight = Gauge("corral_gateway_requests_in_flight",
                               "Model calls being answered", registry=registry)
        self.latency = Histogram("corral_gateway_request_seconds",
                                 "Time to answer a model call", ["model"], buckets=_LATENCY,
                                 registry=registry)
        self.tokens = Counter("corral_gateway_tokens", "Tokens by tenant, model and kind",
                              ["tenant", "model", "kind"], registry=registry)
        self.cost = Counter("corral_gateway_cost_usd", "US dollars spent by tenant and model",
                            ["tenant", "model"], registry=registry)
        self.cache = Counter("corral_gateway_cache_lookups",
                             "Cache lookups by cache and result", ["cache", "result"],
                             registry=registry)
        self.cascade = Counter("corral_gateway_cascade_requests", "Requests to a cascade",
                               ["cascade"], registry=registry)
        self.escalations = Counter("corral_gateway_cascade_escalations",
                                   "Answers a cascade rejected, by model and reason",
                                   ["cascade", "model", "reason"], registry=registry)
        registry.register(_State(state))
        self._children: dict[tuple[str, str, str], tuple[Any, ...]] = {}

    def call(self, tenant: str, model: str, status: str, seconds: float, input_tokens: int,
             output_tokens: int, cached_tokens: int, cost: float) -> None:
        """One model call (the labelled series are looked up once per tenant, model, status)."""
        key = (tenant, model, status)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = (
                self.requests.labels(model, status), self.latency.labels(model),
                self.tokens.labels(tenant, model, "input"),
                self.tokens.labels(tenant, model, "output"),
                self.tokens.labels(tenant, model, "cached_input"),
                self.cost.labels(tenant, model))
        requests, latency, input_, output, cached, spent = found
        requests.inc()
        latency.observe(seconds)
        if input_tokens or output_tokens:
            input_.inc(input_tokens)
            output.inc(output_tokens)
            if cached_tokens:
                cached.inc(cached_tokens)
        if cost:
            spent.inc(cost)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _State(Collector):
    """What the gateway holds, read at scrape time."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        breakers = GaugeMetricFamily("corral_gateway_breaker_open",
                                     "1 while a deployment's circuit breaker is open",
                                     labels=["deployment"])
        for name, is_open in state["breakers"].items():
            breakers.add_metric([name], 1.0 if is_open else 0.0)
        yield breakers
        rejected = CounterMetricFamily("corral_gateway_limit_rejections",
                                       "Calls refused by a rate limit or budget",
                                       labels=["limit", "scope"])
        for what, n in state["rejected"].items():
            rejected.add_metric(what.split(":", 1), n)
        yield rejected
        used = GaugeMetricFamily("corral_gateway_budget_utilization",
                                 "Spent over the hard limit in the current period",
                                 labels=["scope", "name"])
        for (scope, name), ratio in state["utilization"].items():
            used.add_metric([scope, name], ratio)
        yield used
