"""The `corral` command: run workflows, work the queue, look at and steer runs."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from ._errors import (
    CorralError,
    RunCancelled,
    RunConflict,
    RunFailed,
    RunFinished,
    RunNotFound,
    UsageError,
)
from .config import Config, connect, load_config
from .observability._spans import Span
from .observability._traces import assemble, render, summarize
from .runtime import DEFAULT_DB, Runtime, load_workflow
from .stores import JournalEntry, RunRecord, SQLiteStore
from .stores._migrations import MIGRATIONS, _redact, check_redis, is_postgres, upgrade


def _db(args: argparse.Namespace) -> str:
    return str(args.db or os.environ.get("CORRAL_DB") or DEFAULT_DB)


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{what} is not valid JSON ({exc.msg} at column {exc.colno}); "
            "quote strings, e.g. '\"yes\"' or '{\"approved\": true}'"
        ) from None


def _when(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--run-at {text!r} is not an ISO 8601 time; e.g. 2026-11-22T02:00:00+00:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _config(args: argparse.Namespace) -> Config:
    config = load_config(getattr(args, "config", None))
    if getattr(args, "engine", None):
        config = replace(config, engine=args.engine)
    return config


def _runtime(args: argparse.Namespace, config: Config, worker: bool,
             queues: tuple[str, ...]) -> Any:
    """The embedded runtime on --db, or the Temporal one the configuration names."""
    if config.temporal:
        options: dict[str, Any] = {"task_queue": queues[0]} if queues != ("default",) else {}
        if worker:
            options["max_runs"] = getattr(args, "max_runs", 1000)
        return connect(config, worker=worker, **options)
    return Runtime(_db(args), queues=queues, worker=worker,
                   max_runs=getattr(args, "max_runs", 1000), lock_timeout=args.lock_timeout)


async def _run(args: argparse.Namespace) -> int:
    wf = load_workflow(args.workflow)
    value = wf.parse_input(args.input)
    if (args.concurrency_key is None) != (args.concurrency_limit is None):
        raise UsageError("--concurrency-key and --concurrency-limit go together; pass both")
    config = _config(args)
    # on Temporal the cluster's workers run it: this process only submits and waits
    async with _runtime(args, config, not args.no_wait and not config.temporal,
                        (args.queue,)) as rt:
        handle = await rt.start(
            wf,
            value,
            id=args.id,
            queue=None if config.temporal and args.queue == "default" else args.queue,
            priority=args.priority,
            run_at=_when(args.run_at) if args.run_at else None,
            delay=args.delay,
            concurrency_key=args.concurrency_key,
            concurrency_limit=args.concurrency_limit,
        )
        if args.no_wait:
            print(handle.id)
            return 0
        try:
            result = await handle.result()
        except (RunFailed, RunCancelled) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        record = await handle.describe()
    print(record.result if record.result is not None else json.dumps(result))
    return 0


async def _worker(args: argparse.Namespace) -> int:
    queues = tuple(args.queue or ["default"])
    config = _config(args)
    if config.temporal and (args.drain or len(queues) > 1):
        raise UsageError("on Temporal a worker serves one task queue (--queue) until stopped; "
                         "--drain and several --queue are for the embedded engine")
    async with _runtime(args, config, True, queues) as rt:
        from .observability import _runs

        db = _db(args)

        async def metrics() -> bytes:
            """The runs and queues (the store's, or Temporal's visibility and this task
            queue's backlog), and this worker's step and model latencies."""
            if config.temporal:
                return _runs.render(*await rt.count_runs())
            return await asyncio.to_thread(_runs.run_metrics, db)

        health = await _serve_health(args.health_port, rt, metrics) if args.health_port \
            else None
        try:
            if args.drain:
                await rt.drain()
            elif config.temporal:
                print(f"corral worker on Temporal {rt.address}, task queue {rt.task_queue}",
                      file=sys.stderr)
                await rt.wait_closed()
            else:
                print(f"corral worker {rt.id} on {_db(args)}, queues {', '.join(queues)}",
                      file=sys.stderr)
                await asyncio.Event().wait()
        finally:
            if health is not None:
                health.close()
    return 0


async def _serve_health(port: int, rt: Any,
                        metrics: Callable[[], Awaitable[bytes]] | None = None
                        ) -> asyncio.Server:
    """GET /health on 0.0.0.0:port: 200 while the worker works (probes of Kubernetes); GET
    /metrics: runs, queues and this process's latencies for Prometheus."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass
            healthy = rt.healthy
            path = request.split(b" ")[1] if request.count(b" ") >= 2 else b""
            status, body = ((b"200 OK", b"ok\n") if healthy else
                            (b"503 Service Unavailable", b"the worker has stopped\n"))
            content_type = b"text/plain"
            if path == b"/metrics" and metrics is not None:
                try:
                    status, body = b"200 OK", await metrics()
                    content_type = b"text/plain; version=0.0.4"
                except CorralError as exc:
                    status, body = b"503 Service Unavailable", f"{exc}\n".encode()
            elif path != b"/health":
                status, body = b"404 Not Found", b"not found; the probe is GET /health\n"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type + b"\r\n"
                         b"Content-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(answer, "0.0.0.0", port)
    except OSError as exc:
        raise UsageError(f"cannot serve /health on port {port} ({exc.strerror}); choose "
                         "another --health-port") from None


def _gateway(args: argparse.Namespace) -> int:
    from .gateway import Gateway, parse_gateway

    config = _config(args)
    settings = parse_gateway((config.sections or {}).get("gateway"), config.source)
    master_key = settings.master_key()
    try:
        import uvicorn

        from .gateway._server import create_app
    except ImportError:
        raise UsageError("the gateway needs the gateway extra; pip install "
                         "'corral[gateway]'") from None
    from .gateway._keys import KeyCache, KeyStore
    from .gateway._ledger import Ledger

    ledger = Ledger(config.shared_db)
    store = KeyStore(config.shared_db)
    store.active()  # (fails now, saying what to do, when the database lacks the keys table)
    keys = KeyCache(store, settings.keys_refresh)
    from .governance._chain import Governance

    gateway = Gateway(settings, ledger, redis=config.redis,
                      governance=Governance.from_config(config))
    app = create_app(gateway, master_key=master_key, keys=keys)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning", access_log=False))
    print(f"corral gateway on http://{args.host}:{args.port}/v1 ({len(settings.deployments)} "
          f"deployments)", file=sys.stderr)
    import gc

    gc.collect()
    gc.freeze()  # the start-up heap out of the collector's way: shorter pauses under load
    server.run()  # (uvicorn's own loop setup: uvloop when installed)
    return 0 if server.started else 1


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server import Settings, Webhook, create_app
        from .server._app import DEFAULT_TOLERANCE_S
    except ImportError:
        raise UsageError("corral serve needs the gateway extra; pip install "
                         "'corral[gateway]'") from None
    from .runtime._definitions import load_workflows

    config = _config(args)
    section = dict((config.sections or {}).get("server") or {})
    unknown = set(section) - {"master_key_env", "metrics_key_env", "metrics_public",
                              "workflows", "webhooks"}
    if unknown:
        raise UsageError(f"{config.source}: [server] has no {sorted(unknown)[0]!r}; it takes "
                         "master_key_env, metrics_key_env, metrics_public, workflows, webhooks")
    refs = [*(section.get("workflows") or []), *(args.workflows or [])]
    workflows = {wf.name: wf for ref in refs for wf in load_workflows(ref)}
    master_key = None
    if section.get("master_key_env"):
        master_key = os.environ.get(section["master_key_env"]) or None
        if master_key is None:
            raise UsageError(f"${section['master_key_env']} is empty; set it to the master key "
                             "([server] master_key_env)")
    metrics_key = None
    if "metrics_key_env" in section:
        token_env = section["metrics_key_env"]
        metrics_key = os.environ.get(token_env, "") if isinstance(token_env, str) and token_env \
            else ""
        if len(metrics_key) < 16:
            raise UsageError(f"{config.source}: [server] metrics_key_env names {token_env!r}, "
                             "which must hold a scrape token of at least 16 characters")
    metrics_public = section.get("metrics_public", False)
    if not isinstance(metrics_public, bool):
        raise UsageError(f"{config.source}: [server] metrics_public must be true or false, not "
                         f"{metrics_public!r}")
    if metrics_public and metrics_key:
        raise UsageError(f"{config.source}: [server] metrics_public = true serves /metrics "
                         "without a token, so metrics_key_env would protect nothing; keep one")
    webhooks = {}
    for name, hook in (section.get("webhooks") or {}).items():
        if not isinstance(hook, dict) \
                or set(hook) - {"workflow", "secret_env", "tenant", "tolerance_s"} \
                or "workflow" not in hook or "secret_env" not in hook:
            raise UsageError(f"{config.source}: [server.webhooks.{name}] takes workflow, "
                             "secret_env, tenant and tolerance_s (workflow and secret_env "
                             "required)")
        tolerance = hook.get("tolerance_s", DEFAULT_TOLERANCE_S)
        if not isinstance(tolerance, int | float) or isinstance(tolerance, bool) \
                or not 1 <= tolerance <= 86400:
            raise UsageError(f"{config.source}: [server.webhooks.{name}] tolerance_s must be a "
                             f"number of seconds from 1 to 86400, not {tolerance!r}")
        secret = os.environ.get(hook["secret_env"], "")
        if len(secret) < 16:
            raise UsageError(f"webhook {name!r}: ${hook['secret_env']} must hold a secret of at "
                             "least 16 characters")
        if hook["workflow"] not in workflows:
            raise UsageError(f"webhook {name!r} starts {hook['workflow']!r}, which is not among "
                             f"the served workflows ({', '.join(sorted(workflows)) or 'none'})")
        webhooks[name] = Webhook(hook["workflow"], secret.encode(), hook.get("tenant", "default"),
                                 tolerance_s=float(tolerance))
    from .gateway._keys import KeyCache, KeyStore

    db = _db(args)
    shared = config.database or db
    if not is_postgres(shared):  # one file on one machine: bring it up to date
        upgrade(shared)
    # on Temporal, the runs are the cluster's; a worker here serves the default task queue
    rt = connect(config, worker=not args.no_worker) if config.temporal else Runtime(
        db, worker=not args.no_worker, lock_timeout=args.lock_timeout)
    store = KeyStore(shared)
    settings = Settings(workflows=workflows, master_key=master_key, metrics_key=metrics_key,
                        metrics_public=metrics_public, keys=KeyCache(store, 2.0),
                        webhooks=webhooks, shared_db=shared)
    gateway = None
    sections = config.sections or {}
    if sections.get("gateway"):
        from .gateway import Gateway, parse_gateway
        from .gateway._ledger import Ledger
        from .gateway._server import routes
        from .governance._chain import installed

        gateway_settings = parse_gateway(sections["gateway"], config.source)
        gateway = Gateway(gateway_settings, Ledger(shared), redis=config.redis,
                          governance=installed())
        settings.gateway_routes = routes(gateway, master_key=gateway_settings.master_key(),
                                         keys=settings.keys)
        settings.gateway_metrics = gateway.metrics.render
        settings.on_close.append(gateway.close)
    store.active()  # (fails now, saying what to do, if PostgreSQL lacks the tables)
    app = create_app(rt, settings)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning", access_log=False,
                                           lifespan="on"))
    print(f"corral serve on http://{args.host}:{args.port} ({len(workflows)} workflows; "
          "dashboard at /dashboard/)", file=sys.stderr, flush=True)
    server.run()  # (uvicorn's own loop setup: uvloop when installed)
    return 0 if server.started else 1


def _costs(args: argparse.Namespace) -> int:
    import time

    from .gateway._ledger import report

    config = _config(args)
    since = None if args.days is None else time.time() - args.days * 86400
    rows = report(config.shared_db, by=args.by, since=since)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.by.upper():24} {'CALLS':>8} {'IN TOKENS':>12} {'OUT TOKENS':>12} "
          f"{'COST USD':>12}")
    for r in rows:
        unpriced = f"  ({r['unpriced_calls']} unpriced)" if r["unpriced_calls"] else ""
        print(f"{str(r[args.by])[:24]:24} {r['calls']:>8} {r['input_tokens']:>12} "
              f"{r['output_tokens']:>12} {r['cost']:>12.6f}{unpriced}")
    total = sum(r["cost"] for r in rows)
    print(f"{'total':24} {sum(r['calls'] for r in rows):>8} {'':>12} {'':>12} {total:>12.6f}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from .gateway._keys import KeyStore

    store = KeyStore(_config(args).shared_db)
    if args.keys_command == "create":
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models \
            else None
        secret, key = store.create(args.tenant, name=args.name, models=models, rpm=args.rpm,
                                   tpm=args.tpm, budget=args.budget,
                                   budget_period=args.budget_period)
        if args.json:
            print(json.dumps({"key": secret, **key.public()}, indent=2))
        else:
            print(secret)
            print(f"created {key.id} for tenant {key.tenant}; the key is shown only now: "
                  "store it in your secret manager", file=sys.stderr)
        return 0
    if args.keys_command == "revoke":
        key = store.revoke(args.id)
        print(f"revoked {key.id} (tenant {key.tenant}); gateways stop taking it within their "
              "keys_refresh", file=sys.stderr)
        return 0
    keys = store.list()
    if args.json:
        print(json.dumps([k.public() for k in keys], indent=2))
        return 0
    print(f"{'ID':18} {'TENANT':16} {'NAME':16} {'MODELS':20} {'RPM':>6} {'TPM':>8} "
          f"{'BUDGET':>12} STATUS")
    for k in keys:
        budget = f"${k.budget:g}/{k.budget_period}" if k.budget is not None else "-"
        print(f"{k.id:18} {k.tenant[:16]:16} {(k.name or '-')[:16]:16} "
              f"{','.join(k.models or ('*',))[:20]:20} {k.rpm or '-':>6} {k.tpm or '-':>8} "
              f"{budget:>12} {'revoked' if k.revoked_at else 'active'}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .governance import _records as records

    def public_keys() -> list[bytes]:
        found = []
        for name in args.public_key or ():
            try:
                found.append(records.parse_public_key(Path(name).read_bytes(), name))
            except OSError as exc:
                raise UsageError(f"cannot read the public key {name}: {exc.strerror}") from None
        return found

    def write(text: str) -> None:
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print(text, end="")

    if args.audit_command == "verify-proof":  # offline: no database, no configuration
        try:
            proof = json.loads(Path(args.file).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read the proof {args.file}: {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"{args.file} is not JSON ({exc}); it should be what `corral "
                             "audit prove` or `corral audit consistency` wrote") from None
        check = records.verify_proof(proof, public_keys())
        if not check.ok:
            print(f"error: the proof in {args.file} does not verify: {check.message}",
                  file=sys.stderr)
            return 1
        print(f"ok: {check.message}")
        return 0
    if args.audit_command == "keygen":
        try:
            key = records.generate_key_file(args.out)
        except FileExistsError:
            raise UsageError(f"{args.out} exists; keygen never overwrites a key: choose another "
                             "--out") from None
        print(f"wrote the signing key {args.out} (Ed25519, key id "
              f"{records.key_id(records.raw_public_key(key))}); point [governance] signing_key at "
              "it on every writer, keep it secret, and give auditors `corral audit "
              "public-key`", file=sys.stderr)
        return 0
    config = _config(args)
    decisions = records.DecisionLog.from_config(config, public_keys=public_keys()
                                                if "public_key" in args else ())
    if args.audit_command == "public-key":
        write(records.public_key_pem(decisions.public_key()))
        return 0
    if args.audit_command == "prove":
        write(json.dumps(decisions.prove(args.record_id, size=args.size), indent=2) + "\n")
        return 0
    if args.audit_command == "consistency":
        write(json.dumps(decisions.consistency(args.old_size, args.new_size), indent=2) + "\n")
        return 0
    if args.audit_command == "export":
        if args.out:
            with open(args.out, "wb") as out:
                count = decisions.export(out)
        else:
            count = decisions.export(sys.stdout.buffer)
        print(f"exported {count} decision records", file=sys.stderr)
        return 0
    result = decisions.verify()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    if not result.ok:
        print(f"error: the decision log in {_redact(decisions.url)} fails verification: "
              f"{result.problem}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"ok: {result.records} decision records and {result.heads} signed tree heads "
              f"recomputed in {result.seconds:.2f}s; root {result.root or '(empty)'}")
    return 0


def _add_audit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser("audit", help="the decision records: verify, prove, export")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True,
                                          metavar="COMMAND")
    verify = audit_commands.add_parser(
        "verify", help="recompute the whole log; exit 1 naming the first bad record")
    verify.add_argument("--json", action="store_true")
    prove = audit_commands.add_parser(
        "prove", help="print a record's inclusion proof (checked offline by verify-proof)")
    prove.add_argument("record_id", metavar="RECORD_ID")
    prove.add_argument("--size", type=int, help="against the signed head of this tree size "
                                                "(default: the latest)")
    consistency = audit_commands.add_parser(
        "consistency", help="print the proof that a later signed head extends an earlier one")
    consistency.add_argument("old_size", type=int, metavar="OLD_SIZE")
    consistency.add_argument("new_size", type=int, nargs="?", metavar="NEW_SIZE",
                             help="default: the latest head")
    checking = audit_commands.add_parser(
        "verify-proof", help="check a proof file offline, without the database")
    checking.add_argument("file", metavar="FILE")
    export = audit_commands.add_parser(
        "export", help="write the log as JSON lines for an auditor (records and heads)")
    public = audit_commands.add_parser("public-key", help="print the log's public key (PEM)")
    keygen = audit_commands.add_parser("keygen", help="make a signing key for the log")
    keygen.add_argument("--out", required=True, metavar="FILE")
    for sub in (prove, consistency, export, public):
        sub.add_argument("--out", metavar="FILE", help="write here (default: standard output)")
    for sub in (verify, prove, consistency, checking):
        sub.add_argument("--public-key", action="append", metavar="FILE",
                         help="a trusted public key of the log (repeatable; default: the "
                              "configured signing key's)")
    for sub in (verify, prove, consistency, export, public):
        sub.add_argument("--config", metavar="FILE",
                         help="corral.toml naming the database and [governance] signing_key "
                              "(default: $CORRAL_CONFIG or ./corral.toml)")


def _agents(args: argparse.Namespace) -> int:
    from .governance._registry import AgentRegistry

    registry = AgentRegistry(_config(args).shared_db)
    if args.agents_command == "register":
        agent = registry.register(tenant=args.tenant, name=args.name, version=args.version,
                                  owner=args.owner, description=args.description)
        if args.json:
            print(json.dumps(agent.public(), indent=2))
        print(f"registered {agent.ref} in tenant {agent.tenant}, owned by {agent.owner}",
              file=sys.stderr)
        return 0
    if args.agents_command == "deactivate":
        for agent in registry.deactivate(args.name, tenant=args.tenant, version=args.version):
            print(f"deactivated {agent.ref} in tenant {agent.tenant}; gateways and tools "
                  "refuse it within their registry refresh", file=sys.stderr)
        return 0
    agents = registry.list(tenant=args.tenant)
    if args.json:
        print(json.dumps([a.public() for a in agents], indent=2))
        return 0
    print(f"{'TENANT':16} {'NAME':24} {'VERSION':12} {'OWNER':20} {'STATUS':11} "
          f"{'REGISTERED':19} DESCRIPTION")
    for a in agents:
        print(f"{a.tenant[:16]:16} {a.name[:24]:24} {a.version[:12]:12} {a.owner[:20]:20} "
              f"{'active' if a.active else 'deactivated':11} {_time(a.registered_at):19} "
              f"{a.description or '-'}")
    return 0


def _add_agents(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    agents = commands.add_parser("agents", help="the agent registry: who exists, who owns them")
    agents_commands = agents.add_subparsers(dest="agents_command", required=True,
                                            metavar="COMMAND")
    register = agents_commands.add_parser(
        "register", help="register an agent's version (again: no change)")
    register.add_argument("--tenant", required=True)
    register.add_argument("--name", required=True)
    register.add_argument("--version", required=True, help="e.g. 1.4.0 or a git sha")
    register.add_argument("--owner", required=True, help="the team or person answering for it")
    register.add_argument("--description")
    register.add_argument("--json", action="store_true", help="print the record as JSON")
    listing = agents_commands.add_parser("ls", help="list the agents and their owners")
    listing.add_argument("--tenant", help="only this tenant's")
    listing.add_argument("--json", action="store_true")
    deactivate = agents_commands.add_parser(
        "deactivate", help="deactivate an agent (every version, or --version)")
    deactivate.add_argument("name", metavar="NAME")
    deactivate.add_argument("--version", help="only this version")
    deactivate.add_argument("--tenant", help="needed when the name exists in several tenants")
    for sub in (register, listing, deactivate):
        sub.add_argument("--config", metavar="FILE",
                         help="corral.toml naming the database (default: $CORRAL_CONFIG "
                              "or ./corral.toml)")


def _db_upgrade(args: argparse.Namespace) -> int:
    config = _config(args)
    url = config.shared_db
    if not is_postgres(url):
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    applied = upgrade(url)
    where = _redact(url)
    for m in applied:
        print(f"applied {m.version:04d} {m.name}")
    print(f"database {where} is up to date (schema version {MIGRATIONS[-1].version})")
    if config.redis:
        check_redis(config.redis)
        print(f"redis {_redact(config.redis)} answers")
    return 0


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _span(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = end - start
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _entry_dict(entry: JournalEntry) -> dict[str, Any]:
    return {
        "key": entry.key,
        "kind": entry.kind,
        "name": entry.name,
        "status": entry.status,
        "value": None if entry.value is None else json.loads(entry.value),
        "started_at": entry.started_at,
        "ended_at": entry.ended_at,
        "duration_ms": None if entry.ended_at is None
        else round((entry.ended_at - entry.started_at) * 1000, 3),
        "attempts": entry.attempts,
    }


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_runs(runs: list[RunRecord], as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.as_dict() for r in runs], indent=2))
        return
    print(f"{'RUN':34} {'WORKFLOW':20} {'STATUS':10} {'CREATED':19} {'TOOK':>9}")
    for r in runs:
        print(f"{r.id:34} {r.workflow[:20]:20} {r.status:10} {_time(r.created_at):19}"
              f" {_span(r.started_at, r.ended_at):>9}")


def _print_run(run: RunRecord, entries: list[JournalEntry], as_json: bool,
               trace: list[Span] | None = None) -> None:
    summary = summarize(trace) if trace is not None else None
    if as_json:
        shown = {**run.as_dict(), "steps": [_entry_dict(e) for e in entries]}
        if trace is not None:
            shown["trace"] = {"trace_id": trace[0].trace_id if trace else None,
                              "spans": [s.as_dict() for s in trace], **(summary or {})}
        print(json.dumps(shown, indent=2))
        return
    print(f"run       {run.id}")
    print(f"workflow  {run.workflow}")
    extra = " (cancel requested)" if run.cancel_requested and not run.finished else ""
    print(f"status    {run.status}{extra}")
    print(f"queue     {run.queue}  priority {run.priority}  attempts {run.attempts}")
    if run.parent_id:
        print(f"parent    {run.parent_id}")
    print(f"created   {_time(run.created_at)}  started {_time(run.started_at)}"
          f"  ended {_time(run.ended_at)}  took {_span(run.started_at, run.ended_at)}")
    if run.result is not None:
        print(f"result    {_short(json.loads(run.result), 200)}")
    if run.error is not None:
        error = json.loads(run.error)
        print(f"error     {error.get('type')}: {error.get('message')}")
    if trace is not None and summary is not None:
        print("\ntrace " + (trace[0].trace_id if trace else "-"))
        for line in render(trace):
            print("  " + line)
        seconds = summary["seconds"]
        print("\ntime      " + "  ".join(f"{k} {_span(0, v)}" for k, v in seconds.items()))
        tokens = summary["tokens"]
        print(f"cost      ${summary['cost_usd']:.6f}  tokens {tokens['input']} in, "
              f"{tokens['output']} out")
    header = f"{'KEY':8} {'KIND':6} {'NAME':20} {'STATUS':8} {'TOOK':>9} {'TRIES':>5}"
    print(f"\n{header}  VALUE")
    for e in entries:
        value = "" if e.value is None else _short(json.loads(e.value))
        print(f"{e.key:8} {e.kind:6} {e.name[:20]:20} {e.status:8}"
              f" {_span(e.started_at, e.ended_at):>9} {e.attempts:>5}  {value}")


async def _runs_temporal(args: argparse.Namespace, config: Config) -> int:
    async with connect(config, worker=False) as rt:
        if args.runs_command == "ls":
            _print_runs(await rt.list_runs(status=args.status, workflow=args.workflow,
                                           limit=args.limit), args.json)
        elif args.runs_command == "show":
            runs, journals, stored = await rt.trace(args.run_id)
            _print_run(runs[0], journals[runs[0].id], args.json,
                       assemble(runs, journals, stored))
        elif args.runs_command == "cancel":
            await rt.cancel(args.run_id)
            print(f"cancel requested for run {args.run_id}")
        else:
            await rt.signal(args.run_id, args.name, _json_arg(args.value, "the signal value"))
            print(f"signal {args.name!r} sent to run {args.run_id}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    config = _config(args)
    if config.temporal:
        return _until_terminated(_runs_temporal(args, config))
    path = _db(args)
    if not os.path.exists(path):  # reading or steering runs never creates a database
        raise UsageError(f"no database at {path}; start a run first, or pass --db (or set "
                         "$CORRAL_DB) to the database your runs are in")
    store = SQLiteStore(path, timeout=args.lock_timeout)
    try:
        if args.runs_command == "ls":
            _print_runs(store.list_runs(status=args.status, workflow=args.workflow,
                                        limit=args.limit), args.json)
            return 0
        if args.runs_command == "show":
            runs, journals, stored = store.trace(args.run_id)
            _print_run(runs[0], journals[runs[0].id], args.json,
                       assemble(runs, journals, stored))
            return 0
        if args.runs_command == "cancel":
            import time

            store.request_cancel(args.run_id, time.time())
            print(f"cancel requested for run {args.run_id}; a worker stops it at its next "
                  "durable operation")
            return 0
        if args.runs_command == "signal":
            import time

            if args.name.startswith("$"):
                raise UsageError(f"signal names starting with '$' are corral's own, not "
                                 f"{args.name!r}")
            payload = json.dumps(_json_arg(args.value, "the signal value"))
            store.send_signal(args.run_id, args.name, payload, time.time())
            print(f"signal {args.name!r} sent to run {args.run_id}")
            return 0
    finally:
        store.close()
    raise UsageError("usage: corral runs {ls,show,cancel,signal}")


def _until_terminated(main: Any) -> int:
    """Run ``main``; SIGTERM (systemd, Kubernetes) stops it as cleanly as Ctrl-C: runs in
    memory go back to the store for the next worker."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            result: int = await main
            return result
        except asyncio.CancelledError:
            return 143
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(guarded())


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="corral", description="Durable workflows and agents, embedded or on a cluster."
    )
    top.add_argument("--version", action="version", version="corral 0.1.0")
    commands = top.add_subparsers(dest="command", required=True)

    db_help = f"SQLite file (default: $CORRAL_DB or {DEFAULT_DB})"
    run = commands.add_parser("run", help="start a run, wait, print its result as JSON")
    run.add_argument("workflow", help="FILE.py:WORKFLOW or package.module:WORKFLOW")
    run.add_argument("--input", help="the workflow's input as JSON")
    run.add_argument("--id", help="run id; the same id again returns the first run's result")
    run.add_argument("--db", help=db_help)
    run.add_argument("--queue", default="default")
    run.add_argument("--priority", type=int, default=0, help="higher runs first")
    run.add_argument("--run-at", help="start no earlier than this ISO 8601 time")
    run.add_argument("--delay", type=float, help="start no earlier than this many seconds")
    run.add_argument("--concurrency-key", help="runs sharing this key share a limit")
    run.add_argument("--concurrency-limit", type=int, help="at most this many running at once")
    run.add_argument("--no-wait", action="store_true", help="submit, print the run id, exit")

    worker = commands.add_parser("worker", help="execute due runs")
    worker.add_argument("--db", help=db_help)
    worker.add_argument("--drain", action="store_true", help="exit when nothing is runnable")
    worker.add_argument("--queue", action="append", help="queue to serve (repeatable)")
    worker.add_argument("--max-runs", type=int, default=1000, help="runs in memory at once")
    worker.add_argument("--health-port", type=int, metavar="PORT",
                        help="serve GET /health on this port (for Kubernetes probes)")

    gateway = commands.add_parser(
        "gateway", help="serve the model gateway, OpenAI-compatible, over HTTP")
    gateway.add_argument("--config", metavar="FILE",
                         help="corral.toml with a [gateway] section (default: $CORRAL_CONFIG "
                              "or ./corral.toml)")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)

    keys = commands.add_parser("keys", help="the gateway's virtual API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = keys_commands.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--tenant", required=True, help="whose account its calls are on")
    create.add_argument("--name", help="a label: the team or service holding it")
    create.add_argument("--models", metavar="A,B", help="the models it may use (default: all)")
    create.add_argument("--rpm", type=int, help="its requests per minute")
    create.add_argument("--tpm", type=int, help="its tokens per minute")
    create.add_argument("--budget", type=float, metavar="USD", help="its hard budget")
    create.add_argument("--budget-period", default="month",
                        choices=["hour", "day", "month", "total"])
    create.add_argument("--json", action="store_true")
    listing = keys_commands.add_parser("ls", help="list the keys (never their secrets)")
    listing.add_argument("--json", action="store_true")
    revoke = keys_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id", metavar="KEY_ID")
    for sub in (create, listing, revoke):
        sub.add_argument("--config", metavar="FILE",
                         help="corral.toml naming the database (default: $CORRAL_CONFIG "
                              "or ./corral.toml)")

    _add_agents(commands)
    _add_audit(commands)

    serve = commands.add_parser(
        "serve", help="the control plane over HTTP: runs API, approvals, dashboard, gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workflows", action="append", metavar="FILE.py|MODULE[:NAME]",
                       help="workflows the API may start (repeat; also [server] workflows)")
    serve.add_argument("--no-worker", action="store_true",
                       help="serve the API only; separate `corral worker`s execute the runs")

    costs = commands.add_parser("costs", help="what model calls cost, from the gateway's ledger")
    costs.add_argument("--by", choices=["tenant", "workflow", "agent", "model", "day"],
                       default="model")
    costs.add_argument("--days", type=float, metavar="N", help="only the last N days")
    costs.add_argument("--json", action="store_true")
    costs.add_argument("--config", metavar="FILE",
                       help="corral.toml (default: $CORRAL_CONFIG or ./corral.toml)")

    db = commands.add_parser("db", help="the shared database's schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser(
        "upgrade", help="apply schema migrations to the configured database (safe to repeat)")

    runs = commands.add_parser("runs", help="list, show, cancel and signal runs")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True)
    ls = runs_commands.add_parser("ls", help="list runs, newest first")
    ls.add_argument("--status", choices=["queued", "running", "waiting", "completed", "failed",
                                         "cancelled"])
    ls.add_argument("--workflow")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    ls.add_argument("--json", action="store_true")
    show = runs_commands.add_parser("show", help="a run and each of its steps")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    cancel = runs_commands.add_parser("cancel", help="cancel a run and its children")
    cancel.add_argument("run_id")
    send = runs_commands.add_parser("signal", help="send a signal to a run")
    send.add_argument("run_id")
    send.add_argument("name")
    send.add_argument("value", help="the signal's value as JSON")
    engine_help = ("temporal://host:port[?namespace=&task_queue=] to run on Temporal "
                   "(default: $CORRAL_ENGINE or the config file; else embedded)")
    for sub in (run, worker, ls, show, cancel, send, db_upgrade, serve):
        sub.add_argument("--config", metavar="FILE",
                         help="corral.toml (default: $CORRAL_CONFIG or ./corral.toml)")
        if sub is not db_upgrade:
            sub.add_argument("--engine", metavar="URL", help=engine_help)
        if sub not in (run, worker):
            sub.add_argument("--db", help=db_help)
        sub.add_argument("--lock-timeout", type=float, default=5.0, metavar="SECONDS",
                         help="how long to wait for another process's lock on the database")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    code = 1
    try:
        code = _main(argv)
    finally:
        if "temporalio" in sys.modules and argv is None:
            # Temporal's native core can crash the interpreter's finalization after a worker
            # ran (temporalio/sdk-python#300): everything is closed by now, so leave without
            # finalizing, after what would have run at exit.
            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _until_terminated(_run(args))
        if args.command == "worker":
            return _until_terminated(_worker(args))
        if args.command == "db":
            return _db_upgrade(args)
        if args.command == "gateway":
            return _gateway(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "audit":
            return _audit(args)
        if args.command == "agents":
            return _agents(args)
        if args.command == "costs":
            return _costs(args)
        if args.command == "serve":
            return _serve(args)
        return _runs(args)
    except BrokenPipeError:  # e.g. `corral runs show ID | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (UsageError, RunNotFound, RunFinished, RunConflict) as exc:  # the command was wrong
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CorralError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
