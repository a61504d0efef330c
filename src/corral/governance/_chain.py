"""Governance in the two chains: around every model call (the gateway) and every tool call (the
agent loop). One `Governance` per process, built from corral.toml's ``[governance]`` section:

```toml
[governance]
policy = "policy.yaml"        # who may call which tool (resource type "tool", action "call")
enforce_registry = true       # an agent not in the registry calls neither the gateway nor tools
records = true                # a decision record for every model call, tool call, policy
                              # decision and budget stop, in the shared database
signing_key = "keys/decisions.pem"
tenant = "default"            # the tenant of this process's own agents

[governance.redaction]        # before anything leaves for a model
mode = "pseudonymize"         # mask | hash | pseudonymize | off
entities = ["EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS", "SECRET"]
hash_key_env = "CORRAL_REDACTION_KEY"   # mode = "hash": the HMAC secret
```

Model calls: the agent is checked against the registry; every message (and tool-call
argument) is redacted before the provider sees it; with ``pseudonymize`` the placeholders in
the answer are mapped back for the caller, so the originals never leave. Tool calls: the policy
decides ``call`` on ``tool:NAME`` with the arguments as ``context.args``. Each step is recorded,
redacted, in the decision log.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Awaitable, Callable, Container, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._errors import UsageError
from ..observability._spans import run_span_id, trace_id_for
from ..observability._tracing import current_run_id, step_ids
from ..runtime import RetryPolicy, Step
from ._pii import STRUCTURED_ENTITIES, Redactor, Vault
from ._policy import Policy, Resource, Subject, load_policy
from ._records import DecisionLog, DecisionRecord
from ._registry import AgentIdentity, AgentRegistry, UnregisteredAgent
from ._tokens import RevocationList, TokenRejected, verify

if TYPE_CHECKING:
    from ..config import Config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedactionSettings(_Strict):
    mode: Literal["mask", "hash", "pseudonymize", "off"] = "off"
    entities: list[str] = Field(default_factory=lambda: list(STRUCTURED_ENTITIES))
    hash_key_env: str | None = None


class CapabilitySettings(_Strict):
    public_keys: list[str] = Field(min_length=1)
    """PEM files of the issuers' Ed25519 public keys (several while keys rotate)."""
    revocations: bool = True
    """Check revoked tokens in the shared database."""


class GovernanceSettings(_Strict):
    policy: str | None = None
    capabilities: CapabilitySettings | None = None
    """Every tool call needs a capability token that allows it."""
    enforce_registry: bool = False
    records: bool = False
    signing_key: str | None = None
    tenant: str = "default"
    redaction: RedactionSettings = RedactionSettings()


@dataclass(frozen=True, slots=True)
class Principal:
    """The user an agent acts for: ``user:alice`` and what the policy may read about her."""

    type: str
    id: str
    attributes: dict[str, Any] = field(default_factory=dict)


_acting_for: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "corral_acting_for", default=None)
_capability: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "corral_capability", default=None)


@contextmanager
def capability(token: str) -> Iterator[str]:
    """Tool calls made inside present ``token`` (a capability token, see `_tokens`)."""
    reset = _capability.set(token)
    try:
        yield token
    finally:
        with suppress(ValueError):
            _capability.reset(reset)


@contextmanager
def acting_for(user: str, **attributes: Any) -> Iterator[Principal]:
    """Agents run inside act for ``user`` (``"alice"`` or ``"user:alice"``): the policy checks
    relationships for her, and records name her."""
    kind, _, name = user.rpartition(":")
    principal = Principal(kind or "user", name, attributes)
    token = _acting_for.set(principal)
    try:
        yield principal
    finally:
        with suppress(ValueError):  # (closed from another context: a run torn down mid-way)
            _acting_for.reset(token)


@contextmanager
def narrowed(scopes: tuple[str, ...] | list[str]) -> Iterator[str | None]:
    """Inside, the capability token in force is attenuated to ``scopes`` (a specialist gets a
    narrower token than its supervisor, never a wider one); no scopes: unchanged."""
    token = _capability.get()
    if not scopes or token is None:
        yield token
        return
    from ._tokens import Scope, attenuate

    try:
        narrow = attenuate(token, scopes=[Scope.parse(s) for s in scopes])
    except UsageError as exc:  # (asks for more than the token allows)
        raise TokenRejected(f"capability token rejected (widened): {exc}",
                            reason="widened") from None
    with capability(narrow):
        yield narrow


def current_principal() -> Principal | None:
    return _acting_for.get()


class Governance:
    """The links: registry, redaction, policy, records. Each is optional."""

    def __init__(self, *, policy: Policy | None = None, registry: AgentRegistry | None = None,
                 enforce_registry: bool = False, redactor: Redactor | None = None,
                 log: DecisionLog | None = None, tenant: str = "default",
                 capability_keys: list[Ed25519PublicKey] | None = None,
                 revocations: Container[str] = frozenset()) -> None:
        if enforce_registry and registry is None:
            raise UsageError("enforce_registry needs a registry (the shared database)")
        self.policy = policy
        self.registry = registry
        self.enforce_registry = enforce_registry
        self.redactor = redactor
        self.log = log
        self.tenant = tenant
        self.capability_keys = capability_keys
        self.revocations = revocations

    @classmethod
    def from_config(cls, config: Config) -> Governance | None:
        """The process's governance, or None when corral.toml has no [governance] section."""
        section = (config.sections or {}).get("governance")
        if section is None:
            return None
        try:
            settings = GovernanceSettings.model_validate(section)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UsageError(f"{config.source}: governance.{where}: {first['msg']}") from None
        redaction = settings.redaction
        redactor = None
        if redaction.mode != "off":
            key = None
            if redaction.mode == "hash":
                env = redaction.hash_key_env
                key = os.environ.get(env) if env else None
                if not key:
                    raise UsageError("governance.redaction mode = \"hash\" needs hash_key_env, "
                                     "naming a variable that holds a secret of 16+ bytes")
            redactor = Redactor(redaction.entities, mode=redaction.mode,
                                key=key.encode() if key else None)
        registry = AgentRegistry(config.shared_db) if settings.enforce_registry else None
        keys, revoked = None, frozenset[str]()
        if settings.capabilities is not None:
            keys = [_public_key(path) for path in settings.capabilities.public_keys]
            if settings.capabilities.revocations:
                revoked = RevocationList(config.shared_db)  # type: ignore[assignment]
        redact_logs(redactor)
        return cls(policy=load_policy(settings.policy) if settings.policy else None,
                   registry=registry, enforce_registry=settings.enforce_registry,
                   redactor=redactor, tenant=settings.tenant,
                   log=DecisionLog.from_config(config) if settings.records else None,
                   capability_keys=keys, revocations=revoked)

    async def close(self) -> None:
        if self.log is not None:
            await self.log.close()

    # -- identity

    def identify(self, tenant: str, agent: str | None, version: str | None
                 ) -> AgentIdentity | None:
        """The calling agent's registered identity; `UnregisteredAgent` with enforcement on
        when it has none (or did not say who it is)."""
        if not self.enforce_registry:
            return None
        assert self.registry is not None
        if not agent:
            raise UnregisteredAgent("the caller did not name its agent, and only registered "
                                    "agents may call (send X-Corral-Agent and "
                                    "X-Corral-Agent-Version)", tenant=tenant, name="",
                                    version=version or "")
        return self.registry.check(tenant, agent, version or "1")

    # -- redaction (the model chain)

    def redact_request(self, body: dict[str, Any]) -> tuple[dict[str, Any], Vault | None]:
        """The request as the provider may see it, and the vault that maps it back."""
        if self.redactor is None:
            return body, None
        vault = Vault() if self.redactor.mode == "pseudonymize" else None
        messages = []
        for m in body.get("messages") or ():
            m = dict(m)
            if isinstance(m.get("content"), str):
                m["content"] = self.redactor.redact(m["content"], vault=vault).text
            elif isinstance(m.get("content"), list):
                m["content"] = self.redactor.redact_json(m["content"], vault=vault)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": self.redactor.redact(
                        c["function"].get("arguments") or "", vault=vault).text}}
                    for c in m["tool_calls"]]
            messages.append(m)
        redacted = {**body, "messages": messages}
        if "input" in body:  # embeddings
            redacted["input"] = self.redactor.redact_json(body["input"], vault=vault)
        return redacted, vault

    @staticmethod
    def restore_answer(answer: dict[str, Any], vault: Vault | None) -> dict[str, Any]:
        """The provider's answer with the caller's originals back in place of placeholders."""
        if vault is None or not len(vault):
            return answer
        choices = []
        for c in answer.get("choices") or ():
            message = dict(c.get("message") or {})
            if isinstance(message.get("content"), str):
                message["content"] = vault.restore(message["content"])
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    {**t, "function": {**t["function"], "arguments": vault.restore(
                        t["function"].get("arguments") or "")}}
                    for t in message["tool_calls"]]
            choices.append({**c, "message": message})
        return {**answer, "choices": choices}

    # -- the tool chain

    def decide_tool(self, agent: str, version: str, roles: frozenset[str], tool: str,
                    args: Any, resource: str | None = None, *,
                    principal: Principal | None = None, token: str | None = None
                    ) -> tuple[str | None, dict[str, Any]]:
        """Whether ``agent``, acting for ``principal`` and holding the capability ``token``,
        may call ``tool`` with ``args``: None or why not, and the record of the decision.
        It reads the registry and the policy, and writes nothing."""
        acting = None if principal is None else f"{principal.type}:{principal.id}"
        record: dict[str, Any] = {
            "kind": "tool_call", "tenant": self.tenant, "agent": agent,
            "agent_version": version, "acting_for": acting,
            "inputs": {"tool": tool, "args": self.redact_json(args)}, "decision": "allow"}
        try:
            self.identify(self.tenant, agent, version)
        except UnregisteredAgent as exc:
            record.update(kind="policy_decision", decision="deny", rule="registry")
            return f"not allowed: {exc}", record
        if self.capability_keys is not None:
            refused = self._capability(token, tool, args, resource)
            if refused is not None:
                record.update(kind="policy_decision", decision="deny", rule="capability")
                return refused, record
            record["rule"] = "capability"
        if self.policy is not None:
            subject = Subject("agent", agent, roles, {"version": version}, None if principal
                              is None else Subject(principal.type, principal.id,
                                                   attributes=principal.attributes))
            decision = self.policy.authorize(subject, "call", Resource("tool", tool),
                                             {"args": args, "tenant": self.tenant})
            record.update(kind="policy_decision", rule=decision.rule,
                          decision="allow" if decision.allowed else "deny")
            if not decision.allowed:
                return f"not allowed by policy: {decision.reason}", record
        return None, record

    def _capability(self, token: str | None, tool: str, args: Any, template: str | None
                    ) -> str | None:
        """Why ``token`` does not allow this call (None: it does)."""
        if token is None:
            return (f"not allowed: calling {tool} needs a capability token (run it inside "
                    "corral.governance.capability(token))")
        try:
            resource = template.format(**args) if template else tool
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            return f"not allowed: the arguments do not name the resource {template!r}"
        assert self.capability_keys is not None
        try:
            verify(token, self.capability_keys, tool, resource, "call",
                   revoked=self.revocations)
        except TokenRejected as exc:
            return f"not allowed: the capability token was rejected ({exc})"
        except UsageError as exc:
            return f"not allowed: {exc}"
        return None

    async def tool_gate(self, agent: str, version: str, roles: frozenset[str], tool: str,
                        arguments: str, resource: str | None = None
                        ) -> str | None:
        """The tool chain's governance: the decision (None: go on; else why not, for the
        model), made and recorded in one journaled step, so a run resumed after a crash
        replays the decision it made (even if the token has expired since) and does not
        record it twice. (The step's input holds the capability token: short-lived, scoped.)"""
        principal = current_principal()
        return await gate_tool(agent, version, sorted(roles), tool, arguments, resource,
                               None if principal is None else
                               [principal.type, principal.id, principal.attributes],
                               _capability.get())

    # -- human overrides

    async def override(self, run_id: str, what: str, value: Any = None, *,
                       tenant: str | None = None, trace_id: str | None = None) -> None:
        """A human acted on a run (a signal: an approval, an escalation's answer; a cancel):
        recorded and committed before the call returns, so the override is never lost. The
        record is the run's tenant's, in the run's trace (derived from its id when the run
        was not given one)."""
        if self.log is None:
            return
        self.log.append(DecisionRecord(
            kind="human_override", tenant=tenant or self.tenant, run_id=run_id, decision=what,
            acting_for=f"user:{_operator()}", inputs=self.redact_json(value),
            trace_id=trace_id or trace_id_for(run_id), span_id=run_span_id(run_id)))
        await self.log.flush()

    # -- records

    def redact_json(self, value: Any) -> Any:
        return value if self.redactor is None else self.redactor.redact_json(value)

    def record(self, record: DecisionRecord) -> None:
        if self.log is not None:
            self.log.append(_traced(record))


def _traced(record: DecisionRecord) -> DecisionRecord:
    """Made in a step: the record names the step's span, so a decision leads to its trace."""
    if record.trace_id is None:
        ids = step_ids()
        if ids is not None:  # (a record's id is given at creation: keep it)
            object.__setattr__(record, "trace_id", ids[0])
            object.__setattr__(record, "span_id", ids[1])
            if record.run_id is None:
                object.__setattr__(record, "run_id", current_run_id())
    return record


def redact_logs(redactor: Redactor | None) -> None:
    """corral's log records (loggers ``corral.*``) are redacted as they are made, before any
    handler writes them (None: no longer)."""
    global _log_redactor, _log_factory
    if not _log_factory and redactor is not None:
        _log_factory = True
        make = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = make(*args, **kwargs)
            active = _log_redactor
            if active is not None and record.name.startswith("corral"):
                record.msg = active.redact(record.getMessage()).text
                record.args = None
            return record

        logging.setLogRecordFactory(factory)
    _log_redactor = redactor if redactor is None or redactor.mode != "pseudonymize" \
        else Redactor(redactor.entities, mode="mask")  # (a log has no vault to restore from)


_log_redactor: Redactor | None = None
_log_factory = False


def _public_key(path: str) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"governance.capabilities: cannot read the public key {path} "
                         f"({exc}); give a PEM file of an Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"governance.capabilities: {path} is not an Ed25519 public key")
    return key


def _operator() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # (no user name in this environment)
        return "unknown"


async def overridden(run_id: str, what: str, value: Any = None,
                     run: Callable[[], Awaitable[Any]] | None = None) -> None:
    """Record a human override with the process's governance, if it records decisions;
    ``run`` reads the run's record, for its tenant and trace."""
    governance = installed()
    if governance is not None and governance.log is not None:
        record = await run() if run is not None else None
        await governance.override(run_id, what, value, tenant=getattr(record, "tenant", None),
                                  trace_id=getattr(record, "trace_id", None))


_installed: Governance | None = None
_loaded = False


def install(governance: Governance | None) -> None:
    """Make ``governance`` this process's (None: none)."""
    global _installed, _loaded
    _installed, _loaded = governance, True


def installed() -> Governance | None:
    """The process's governance: the installed one, or the first use builds it from
    corral.toml's [governance] section (None without one)."""
    global _installed, _loaded
    if not _loaded:
        from ..config import load_config

        _installed, _loaded = Governance.from_config(load_config()), True
    return _installed


async def _gate(agent: str, version: str, roles: list[str], tool: str, arguments: str,
                resource: str | None, principal: list[Any] | None, token: str | None
                ) -> str | None:
    governance = installed()
    if governance is None:
        return None
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        args = arguments
    acting = None if principal is None else Principal(principal[0], principal[1],
                                                      dict(principal[2]))
    denied, record = governance.decide_tool(agent, version, frozenset(roles), tool, args,
                                            resource, principal=acting, token=token)
    if governance.log is not None:
        governance.log.append(_traced(DecisionRecord(**record)))
        await governance.log.flush()  # (committed before the step is: never lost)
    return denied


gate_tool: Step[Any, str | None] = Step(_gate, name="corral.governance:tool",
                                        retry=RetryPolicy(max_attempts=3), timeout=30)
"""A tool call's governance, decided and recorded once per run: a journaled step."""
