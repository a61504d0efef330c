"""The model gateway: one door for every model call, in process and OpenAI-compatible over HTTP.

This first part routes, fails over, retries and breaks circuits across deployments of any
OpenAI-compatible provider (and the simulator), and records every call's cost in a ledger;
keys, limits, budgets and caches build on it.
"""

from ._config import Breaker, Deployment, GatewayConfig, Price, Retry, parse_gateway
from ._inprocess import GatewayModel, install
from ._router import Caller, Gateway, GatewayError

__all__ = ["Breaker", "Caller", "Deployment", "Gateway", "GatewayConfig", "GatewayError",
           "GatewayModel", "Price", "Retry", "install", "parse_gateway"]
