"""The model gateway: one door for every model call, in process and OpenAI-compatible over HTTP.

This first part routes, fails over, retries and breaks circuits across deployments of any
OpenAI-compatible provider (and the simulator); keys, limits, budgets, caches and the cost
ledger build on it.
"""

from ._config import Breaker, Deployment, GatewayConfig, Retry, parse_gateway
from ._router import Gateway, GatewayError

__all__ = ["Breaker", "Deployment", "Gateway", "GatewayConfig", "GatewayError", "Retry",
           "parse_gateway"]
