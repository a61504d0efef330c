"""The control plane over HTTP: runs (submit, get, list, cancel, signal, events, traces),
webhooks that start runs, approvals, costs, the decision log's status, /metrics, the
dashboard, and the gateway's OpenAI-compatible routes when a gateway is configured.

Every /v1 request sends a key as ``Authorization: Bearer KEY``: a key from ``corral keys
create`` acts for its tenant and sees only its tenant's runs; the master key
(``[server] master_key_env``) sees every tenant and may act for one with ``X-Corral-Tenant``.
/metrics spans every tenant: the master key or the scrape token (``[server] metrics_key_env``)
reads it, a tenant's key does not, unless ``[server] metrics_public = true``.
Errors are ``{"error": {"message", "type", "code"}}`` with the HTTP status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .._errors import (
    CorralError,
    InvalidCursor,
    RunConflict,
    RunFinished,
    RunNotFound,
    UsageError,
)
from ..observability._traces import assemble, summarize
from ..observability._tracing import parse_traceparent
from ..runtime import Workflow
from ..stores import RunRecord
from ._openapi import spec
from ._reads import EmbeddedReads, TemporalReads, reads_for

log = logging.getLogger("corral.server")

STATIC = Path(__file__).parent / "static"
STATUSES = ("queued", "running", "waiting", "completed", "failed", "cancelled")
MAX_BODY = 1 << 20
DEFAULT_TOLERANCE_S = 300.0
"""How far a webhook's X-Corral-Timestamp may be from the server's clock, either way."""
_STAMP = re.compile(r"[0-9]{1,12}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, *,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code, self.type = status, code, type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.type,
                                       "code": self.code}}, status_code=self.status)


@dataclass(frozen=True)
class Webhook:
    """``POST /v1/hooks/{name}`` starts ``workflow`` for ``tenant`` with the body as input,
    when the request is signed: ``X-Corral-Timestamp: <Unix seconds>`` and
    ``X-Corral-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``, the timestamp
    at most ``tolerance_s`` from the server's clock."""

    workflow: str
    secret: bytes
    tenant: str = "default"
    tolerance_s: float = DEFAULT_TOLERANCE_S


@dataclass
class Settings:
    workflows: dict[str, Workflow[Any, Any]]
    master_key: str | None = None
    metrics_key: str | None = None
    """The scrape token: reads /metrics and nothing else."""
    metrics_public: bool = False
    """/metrics without a token, for a port only the cluster reaches."""
    keys: Any = None
    """A gateway KeyCache: tenant-scoped keys."""
    webhooks: dict[str, Webhook] = field(default_factory=dict)
    shared_db: str | None = None
    """Where the cost ledger and the decision log are."""
    gateway_routes: list[Route] = field(default_factory=list)
    gateway_metrics: Callable[[], bytes] | None = None
    audit_every: float = 60.0
    on_close: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    """Run when the server stops (the gateway's close: its ledger's last rows)."""


@dataclass(frozen=True)
class Principal:
    tenant: str | None
    """None: the master key, every tenant."""
    key_id: str

    def sees(self, run: RunRecord) -> bool:
        return self.tenant is None or (run.tenant or "default") == self.tenant


def create_app(rt: Any, settings: Settings) -> Starlette:
    """The app over ``rt``: a `corral.Runtime` (embedded) or a `TemporalRuntime`."""
    reads: EmbeddedReads | TemporalReads = reads_for(rt)
    audit_cache: dict[str, Any] = {}

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def authorize(request: Request) -> Principal:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secret:
            if settings.master_key and hmac.compare_digest(secret.encode(),
                                                           settings.master_key.encode()):
                return Principal(None, "master")
            key = await settings.keys.find(secret) if settings.keys is not None else None
            if key is not None:
                return Principal(key.tenant, key.id)
        raise ApiError(401, "invalid API key: send a key from `corral keys create --tenant "
                       "NAME` (or the server's master key) as 'Authorization: Bearer KEY'",
                       "invalid_api_key", type="authentication_error")

    async def scraper(request: Request) -> Principal:
        """/metrics spans every tenant: the master key or the scrape token reads it."""
        if settings.metrics_public:
            return Principal(None, "public")
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secret:
            for key_id, token in (("master", settings.master_key),
                                  ("metrics", settings.metrics_key)):
                if token and hmac.compare_digest(secret.encode(), token.encode()):
                    return Principal(None, key_id)
            if settings.keys is not None and await settings.keys.find(secret) is not None:
                raise ApiError(403, "a tenant's key cannot read /metrics: the metrics span "
                               "every tenant; scrape with the token in [server] "
                               "metrics_key_env (or the master key)", "forbidden",
                               type="permission_error")
        raise ApiError(401, "GET /metrics needs 'Authorization: Bearer TOKEN' with the token "
                       "in [server] metrics_key_env (or the master key); in Prometheus, give "
                       "the scrape job authorization: {credentials_file: FILE}. On a port only "
                       "the cluster reaches, [server] metrics_public = true serves it openly",
                       "invalid_api_key", type="authentication_error")

    async def body_of(request: Request) -> Any:
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes; send less",
                               "request_too_large")
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})",
                           "invalid_json") from None

    async def visible(principal: Principal, run_id: str) -> RunRecord:
        try:
            run: RunRecord = await reads.get_run(run_id)
        except RunNotFound:
            run = None  # type: ignore[assignment]
        if run is None or not principal.sees(run):
            raise ApiError(404, f"no run {run_id!r} for this key; list runs with GET /v1/runs",
                           "run_not_found")
        return run

    def endpoint(handler: Callable[[Request, Principal], Awaitable[Response]],
                 auth: Callable[[Request], Awaitable[Principal]] | None = authorize,
                 ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                principal = await auth(request) if auth is not None else Principal(None, "")
                return await handler(request, principal)
            except ApiError as exc:
                return exc.response()
            except RunConflict as exc:
                return ApiError(409, str(exc), "conflict").response()
            except (UsageError, ValueError) as exc:
                return ApiError(400, str(exc), "invalid_request").response()
            except CorralError as exc:
                log.error("server: %s %s failed: %s", request.method, request.url.path, exc)
                return ApiError(503, f"the store failed on this request ({exc}); retry",
                                "unavailable", type="api_error").response()
            except Exception:
                log.exception("server: %s %s failed", request.method, request.url.path)
                return ApiError(500, "the server failed on this request; its log has the "
                                "details", "internal_error", type="api_error").response()
        return wrapped

    # -- runs ---------------------------------------------------------------------------------

    async def submit(workflow_name: Any, value: Any, tenant: str, idempotency: str | None,
                     options: dict[str, Any], traceparent: str | None) -> Response:
        if not isinstance(workflow_name, str) or workflow_name not in settings.workflows:
            known = ", ".join(sorted(settings.workflows)) or "none (start corral serve with "
            "--workflows FILE)"
            raise ApiError(404, f"no workflow {workflow_name!r} on this server; the workflows "
                           f"are {known}", "workflow_not_found")
        run_id = None
        if idempotency is not None:
            if not 0 < len(idempotency) <= 255:
                raise ApiError(400, "Idempotency-Key must be 1 to 255 characters",
                               "invalid_idempotency_key")
            # the key is the tenant's own: the same key from two tenants names two runs
            run_id = "idem-" + hashlib.blake2b(f"{tenant}\n{idempotency}".encode(),
                                               digest_size=16).hexdigest()
        parent = parse_traceparent(traceparent)
        handle = await rt.start(settings.workflows[workflow_name], value, id=run_id,
                                tenant=tenant, trace_id=parent[0] if parent else None,
                                **options)
        run = await reads.get_run(handle.id)
        if (run.tenant or "default") != tenant:  # (an idempotency key cannot reach across)
            raise ApiError(409, "this Idempotency-Key was used for another run", "conflict")
        return JSONResponse(run.as_dict(), status_code=201 if handle.created else 200,
                            headers={"Location": f"/v1/runs/{run.id}"})

    async def create_run(request: Request, principal: Principal) -> Response:
        body = await body_of(request)
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be a JSON object: {"workflow": NAME, "input": '
                           "...}", "invalid_request")
        unknown = set(body) - {"workflow", "input", "queue", "priority", "delay", "run_at"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}; the fields are "
                           "workflow, input, queue, priority, delay, run_at", "invalid_request")
        options: dict[str, Any] = {}
        if "queue" in body:
            if not isinstance(body["queue"], str) or not body["queue"]:
                raise ApiError(400, "queue must be a non-empty string", "invalid_request")
            options["queue"] = body["queue"]
        if "priority" in body:
            if not isinstance(body["priority"], int) or isinstance(body["priority"], bool) \
                    or not -1000 <= body["priority"] <= 1000:
                raise ApiError(400, "priority must be an integer from -1000 to 1000",
                               "invalid_request")
            options["priority"] = body["priority"]
        if "delay" in body:
            delay = body["delay"]
            if not isinstance(delay, int | float) or isinstance(delay, bool) \
                    or not 0 <= delay <= 366 * 86400:
                raise ApiError(400, "delay must be a number of seconds from 0 to a year",
                               "invalid_request")
            options["delay"] = float(delay)
        if "run_at" in body:
            try:
                options["run_at"] = datetime.fromisoformat(body["run_at"])
            except (TypeError, ValueError):
                raise ApiError(400, "run_at must be an ISO 8601 time, e.g. "
                               "2026-01-31T09:00:00+00:00", "invalid_request") from None
        return await submit(body.get("workflow"), body.get("input"), _tenant(request, principal),
                            request.headers.get("idempotency-key"), options,
                            request.headers.get("traceparent"))

    async def list_runs(request: Request, principal: Principal) -> Response:
        q = request.query_params
        status = q.get("status") or None
        if status is not None and status not in STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(STATUSES)}, not {status!r}",
                           "invalid_request")
        limit = _int(q.get("limit"), 50, 1, 500, "limit")
        for name in ("workflow", "tenant"):
            if "\0" in q.get(name, ""):
                raise ApiError(400, f"{name} cannot hold a NUL character", "invalid_request")
        tenant = principal.tenant if principal.tenant is not None else q.get("tenant") or None
        try:
            runs, next_cursor = await reads.list_runs(
                status=status, workflow=q.get("workflow") or None, limit=limit, tenant=tenant,
                cursor=q.get("cursor") or None)
        except InvalidCursor as exc:
            raise ApiError(400, str(exc), "invalid_cursor") from None
        return JSONResponse({"runs": [r.as_dict() for r in runs if principal.sees(r)],
                             "next_cursor": next_cursor})

    async def get_run(request: Request, principal: Principal) -> Response:
        run = await visible(principal, request.path_params["run_id"])
        return JSONResponse(run.as_dict())

    async def get_trace(request: Request, principal: Principal) -> Response:
        run = await visible(principal, request.path_params["run_id"])
        runs, journals, stored = await reads.trace(run.id)
        spans = assemble(runs, journals, stored)
        return JSONResponse({"trace_id": spans[0].trace_id if spans else None,
                             "spans": [s.as_dict() for s in spans], **summarize(spans)})

    async def cancel_run(request: Request, principal: Principal) -> Response:
        run = await visible(principal, request.path_params["run_id"])
        if run.finished:
            raise ApiError(409, f"run {run.id} has already ended ({run.status})", "run_finished")
        await rt.cancel(run.id)
        return JSONResponse((await reads.get_run(run.id)).as_dict(), status_code=202)

    async def signal_run(request: Request, principal: Principal) -> Response:
        run = await visible(principal, request.path_params["run_id"])
        name = request.path_params["name"]
        if name.startswith("$") or not name:
            raise ApiError(400, f"signal names starting with '$' are corral's own, not {name!r}",
                           "invalid_signal")
        body = await body_of(request)
        if body is not None and (not isinstance(body, dict) or set(body) - {"value"}):
            raise ApiError(400, 'the body must be {"value": ANY} (or empty for null)',
                           "invalid_request")
        try:
            await rt.signal(run.id, name, (body or {}).get("value"))
        except RunFinished as exc:
            raise ApiError(409, str(exc), "run_finished") from None
        return JSONResponse({"run_id": run.id, "signal": name, "accepted": True},
                            status_code=202)

    async def events(request: Request, principal: Principal) -> Response:
        run = await visible(principal, request.path_params["run_id"])
        return StreamingResponse(_events(reads, run, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def approvals(request: Request, principal: Principal) -> Response:
        seen: set[str] = set()
        pending: list[dict[str, Any]] = []
        for run in await reads.waiting(principal.tenant):
            if run.id in seen or not principal.sees(run):
                continue
            seen.add(run.id)
            data = run.as_dict()
            pending.extend({"run": data, "signal": name} for name in data["waiting_on"])
        return JSONResponse({"approvals": pending})

    # -- webhooks -----------------------------------------------------------------------------

    async def hook(request: Request, principal: Principal) -> Response:
        name = request.path_params["name"]
        webhook = settings.webhooks.get(name)
        if webhook is None:
            raise ApiError(404, f"no webhook {name!r} on this server", "webhook_not_found")
        data = await request.body()
        if len(data) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", "request_too_large")
        _check_signature(webhook, request.headers.get("x-corral-signature"),
                         request.headers.get("x-corral-timestamp"), data, time.time())
        try:
            value = json.loads(data) if data else None
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON ({exc})", "invalid_json") from None
        delivery = request.headers.get("x-corral-delivery") or request.headers.get(
            "idempotency-key")
        return await submit(webhook.workflow, value, webhook.tenant,
                            f"hook:{name}:{delivery}" if delivery else None, {},
                            request.headers.get("traceparent"))

    # -- costs and the decision log -----------------------------------------------------------

    async def costs(request: Request, principal: Principal) -> Response:
        q = request.query_params
        by = q.get("by") or "tenant"
        if by not in ("tenant", "agent", "model", "workflow"):
            raise ApiError(400, f"by must be tenant, agent, model or workflow, not {by!r}",
                           "invalid_request")
        bucket = _int(q.get("bucket"), 3600, 60, 31 * 86400, "bucket")
        since = _float(q.get("since"), time.time() - 7 * 86400, "since")
        series = await call(_cost_series, settings.shared_db, by, bucket, since,
                            principal.tenant)
        return JSONResponse({"by": by, "bucket": bucket, "series": series,
                             "total_usd": round(sum(p[1] for s in series for p in s["points"]),
                                                8)})

    async def audit(request: Request, principal: Principal) -> Response:
        now = time.time()
        if audit_cache.get("checked_at", 0) + settings.audit_every < now:
            audit_cache.clear()
            audit_cache.update(await call(_audit_status, settings.shared_db), checked_at=now)
        return JSONResponse(audit_cache)

    # -- the rest -----------------------------------------------------------------------------

    async def metrics(request: Request, principal: Principal) -> Response:
        text = await reads.metrics()
        if settings.gateway_metrics is not None:
            text += settings.gateway_metrics()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def health(request: Request, principal: Principal) -> Response:
        if not rt.healthy:
            return JSONResponse({"status": "worker stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def openapi(request: Request, principal: Principal) -> Response:
        return JSONResponse(spec(sorted(settings.workflows), sorted(settings.webhooks),
                                 metrics_public=settings.metrics_public))

    async def home(request: Request) -> Response:
        return RedirectResponse("/dashboard/")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                            "method_not_allowed").response()
        return ApiError(404, f"no route {request.url.path}; GET /openapi.json lists the routes",
                        "not_found").response()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        """The runtime lives as long as the server: stopping (SIGTERM included) hands the
        runs in memory back to the store and releases the worker's lock."""
        async with rt:
            try:
                yield
            finally:
                for close in settings.on_close:
                    await close()
                reads.close()

    routes: list[Any] = [
        Route("/", home, methods=["GET"]),
        Route("/healthz", endpoint(health, auth=None), methods=["GET"]),
        Route("/openapi.json", endpoint(openapi, auth=None), methods=["GET"]),
        Route("/metrics", endpoint(metrics, auth=scraper), methods=["GET"]),
        Route("/v1/runs", endpoint(create_run), methods=["POST"]),
        Route("/v1/runs", endpoint(list_runs), methods=["GET"]),
        Route("/v1/runs/{run_id}", endpoint(get_run), methods=["GET"]),
        Route("/v1/runs/{run_id}/trace", endpoint(get_trace), methods=["GET"]),
        Route("/v1/runs/{run_id}/events", endpoint(events), methods=["GET"]),
        Route("/v1/runs/{run_id}/cancel", endpoint(cancel_run), methods=["POST"]),
        Route("/v1/runs/{run_id}/signals/{name}", endpoint(signal_run), methods=["POST"]),
        Route("/v1/approvals", endpoint(approvals), methods=["GET"]),
        Route("/v1/costs", endpoint(costs), methods=["GET"]),
        Route("/v1/audit", endpoint(audit), methods=["GET"]),
        Route("/v1/hooks/{name}", endpoint(hook, auth=None), methods=["POST"]),
        *settings.gateway_routes,
    ]
    if STATIC.is_dir():
        routes.append(Mount("/dashboard", StaticFiles(directory=STATIC, html=True)))
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found},
                     lifespan=lifespan)


def _tenant(request: Request, principal: Principal) -> str:
    if principal.tenant is not None:
        return principal.tenant
    return request.headers.get("x-corral-tenant") or "default"


def _check_signature(webhook: Webhook, signature: str | None, stamp: str | None, body: bytes,
                     now: float) -> None:
    """Raises a 401 unless ``signature`` is ``sha256=<hex HMAC-SHA256 of "<stamp>.<body>">``
    with the webhook's secret and ``stamp`` (Unix seconds) is within its tolerance of ``now``.
    The signed timestamp bounds a replay to the tolerance; the delivery id stops it within."""

    def signs(message: bytes) -> bool:
        expected = "sha256=" + hmac.new(webhook.secret, message, hashlib.sha256).hexdigest()
        return hmac.compare_digest((signature or "").encode(), expected.encode())

    def refuse(message: str, code: str) -> ApiError:
        return ApiError(401, message, code, type="authentication_error")

    how = ("send X-Corral-Timestamp: <Unix seconds> and X-Corral-Signature: sha256=<hex "
           "HMAC-SHA256 of '<timestamp>.<raw body>' with the webhook's secret>")
    if signature and signs(body):  # the scheme before timestamps: refused, said so
        raise refuse("X-Corral-Signature signs the body alone, which a replay could reuse for "
                     f"ever; signatures now cover a timestamp: {how}", "outdated_signature")
    if not signature or not stamp:
        missing = [name for name, value in (("X-Corral-Signature", signature),
                                            ("X-Corral-Timestamp", stamp)) if not value]
        raise refuse(f"missing {' and '.join(missing)}: {how}",
                     "invalid_signature" if not signature else "invalid_timestamp")
    if not _STAMP.fullmatch(stamp):
        raise refuse("X-Corral-Timestamp must be the Unix time in whole seconds, not "
                     f"{stamp[:32]!r}", "invalid_timestamp")
    if not signs(f"{stamp}.".encode() + body):
        raise refuse(f"bad X-Corral-Signature: {how}", "invalid_signature")
    skew = now - int(stamp)
    if abs(skew) > webhook.tolerance_s:
        when = f"{skew:.0f} s old" if skew > 0 else f"{-skew:.0f} s in the future"
        raise refuse(f"X-Corral-Timestamp is {when}, past this webhook's tolerance of "
                     f"{webhook.tolerance_s:g} s: sign each delivery (and each retry) as it is "
                     "sent, and check the sender's clock", "timestamp_out_of_tolerance")


def _int(text: str | None, default: int, low: int, high: int, name: str) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}, not {text!r}",
                       "invalid_request")
    return value


def _float(text: str | None, default: float, name: str) -> float:
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise ApiError(400, f"{name} must be a number (unix seconds), not {text!r}",
                       "invalid_request")
    return value


async def _events(reads: EmbeddedReads | TemporalReads, run: RunRecord,
                  request: Request) -> AsyncIterator[bytes]:
    """The run's status changes and journal entries as they happen, then ``end``."""
    seen_status, seen_steps, quiet = None, 0, 0.0
    while True:
        if seen_status != run.status:
            seen_status = run.status
            yield _sse("run", run.as_dict())
        entries = await reads.journal(run.id)
        for entry in entries[seen_steps:]:
            if entry.status != "pending":
                yield _sse("step", {"key": entry.key, "kind": entry.kind, "name": entry.name,
                                    "status": entry.status, "started_at": entry.started_at,
                                    "ended_at": entry.ended_at})
                seen_steps += 1
            else:
                break
        if run.finished:
            yield _sse("end", {"id": run.id, "status": run.status})
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.25)
        quiet += 0.25
        if quiet >= 15:  # a comment now and then keeps proxies from closing a quiet stream
            quiet = 0.0
            yield b": keep-alive\n\n"
        run = await reads.get_run(run.id)


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _cost_series(db: str | None, by: str, bucket: int, since: float,
                 tenant: str | None) -> list[dict[str, Any]]:
    if db is None:
        return []
    from ..stores._migrations import connect, is_postgres

    postgres = is_postgres(db)
    mark = "%s" if postgres else "?"
    sql = (f"SELECT CAST(floor(at / {bucket}) AS BIGINT) * {bucket}, coalesce({by}, ''),"
           f" sum(cost) FROM corral_costs WHERE at >= {mark}")
    params: list[Any] = [since]
    if tenant is not None:
        sql += f" AND tenant = {mark}"
        params.append(tenant)
    sql += " GROUP BY 1, 2 ORDER BY 1, 2"
    if not postgres:
        sql = sql.replace("floor(at / ", "(at / ").replace("AS BIGINT", "AS INTEGER")
    conn = connect(db)
    try:
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
        except Exception as exc:
            if "corral_costs" in str(exc):  # no gateway has written the ledger yet
                return []
            raise
        rows = cur.fetchall()
    finally:
        conn.close()
    series: dict[str, list[list[float]]] = {}
    for start, key, cost in rows:
        series.setdefault(key or "(none)", []).append([float(start), round(float(cost), 8)])
    return [{"key": k, "points": v} for k, v in series.items()]


def _audit_status(db: str | None) -> dict[str, Any]:
    from ..governance._chain import installed

    governance = installed()
    log_ = governance.log if governance is not None else None
    if log_ is None:
        return {"enabled": False, "size": 0, "verified": None, "root": None, "problem": None}
    head = log_.head()
    check = log_.verify()
    return {"enabled": True, "size": check.records, "verified": check.ok,
            "root": head.root.hex() if head is not None else None,
            "problem": None if check.ok else getattr(check, "problem", "verification failed")}
