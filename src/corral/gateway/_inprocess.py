"""corral's agents through the gateway, in process: the same routing, failover and cost
ledger as over HTTP, without the network hop. ``Agent(..., model="gateway:fast")``."""

from __future__ import annotations

from typing import Any

from .._errors import ProviderError
from ..agents._agent import calling_agent
from ..agents._messages import ModelRequest, ModelResponse
from ..agents._openai import chat_body, parse_completion
from ..runtime._definitions import current_step
from ._router import Caller, Gateway, GatewayError

_installed: Gateway | None = None


def install(gateway: Gateway | None) -> None:
    """Make ``gateway`` the one ``gateway:`` models use in this process (None: uninstall)."""
    global _installed
    _installed = gateway


def installed() -> Gateway:
    """The process's gateway; the first use builds it from corral.toml's [gateway] section,
    with its cost ledger in the shared database."""
    global _installed
    if _installed is None:
        from ..config import load_config
        from ._config import parse_gateway
        from ._ledger import Ledger

        config = load_config()
        settings = parse_gateway((config.sections or {}).get("gateway"), config.source)
        from ..governance._chain import installed as governance

        _installed = Gateway(settings, Ledger(config.shared_db), redis=config.redis,
                             governance=governance())
    return _installed


class GatewayModel:
    """A model behind the gateway. Each call is on the tenant's account (``tenant``; by
    default the run's, else "default"), labelled with the agent, run and workflow it is made
    for."""

    def __init__(self, model: str, *, gateway: Gateway | None = None,
                 tenant: str | None = None) -> None:
        self.model = model
        self.name = f"gateway:{model}"
        self.accounted = True  # the gateway prices its calls (and puts the cost on the span)
        self._gateway = gateway
        self.tenant = tenant

    async def complete(self, request: ModelRequest) -> ModelResponse:
        gateway = self._gateway or installed()
        step = current_step.get()
        run_id, workflow = (step[0], step[1]) if step else (None, None)
        agent, version = calling_agent.get() or (None, None)
        tenant = self.tenant or (step and step[3].tenant) or "default"
        caller = Caller(tenant=tenant, key_id="in-process", workflow=workflow,
                        run_id=run_id, agent=agent, agent_version=version)
        try:
            answer: dict[str, Any] = await gateway.chat(chat_body(self.model, request), caller)
        except GatewayError as exc:
            raise ProviderError(
                f"{self.name}: {exc}", status=exc.status, body=str(exc), headers={},
                retryable=exc.status in (429, 502, 503),
            ) from None
        return parse_completion(self.name, answer)
