"""The span shipper: a process of its own that exports a store's spans over OTLP/HTTP.

An embedded worker commits its spans to the store anyway (the journal is most of a trace, and
the spans with more to say are rows beside it); with a shipper, it also logs which runs ended
(``run_ends``, a row per run, in the commit). Exporting them from the worker itself costs
25 to 35 µs of CPU per step under the worker's GIL (docs/benchmarks.md); the shipper does it on
another core instead, by tailing the store: journal entries, stored spans and run ends past a
cursor, in commit order, built into spans, sampled by trace id, sent in requests of max_batch.
The cursor (the ``exports`` table, one row per endpoint) moves only once the collector has taken
the spans, so a collector that is down, or a shipper killed mid-round, loses nothing: the
spans wait in the store and go when it answers again. The cursor is written at most once a
second and when the shipper stops (a write per round held up a busy worker's commits): what a
killed shipper sent since its last write is sent again, with the same span ids.

A worker starts its shipper when it opens and stops it when it closes (the shipper sends what
is committed by then, for up to ``STOP_TIMEOUT`` seconds; what is left goes with the next
one). Workers sharing a database run one shipper per endpoint between them: the others wait
on its lock and take over when its worker stops. The worker tells its shipper to stop by
closing the shipper's stdin, which its death does too: a shipper never outlives its worker by
more than the time it takes to send what the worker committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ._otlp import OTLPExporter
from ._spans import run_span_id, step_span_id, trace_id_for
from ._traces import child_parent, journal_span, run_span

if TYPE_CHECKING:
    from ..stores.sqlite import SQLiteStore

log = logging.getLogger("corral.observability")

STOP_TIMEOUT = 10.0
"""How long a closing worker waits for its shipper to send what is committed."""
RESTART_AFTER = 30.0
"""A shipper that dies is started again by its worker, at most this often (seconds)."""
ROUND_ROWS = 1024
"""Rows read per table per round (sent in requests of the exporter's ``max_batch`` spans)."""
SAVE_EVERY = 1.0
"""The cursor is written at most this often (seconds), and when the shipper stops: a busy
worker's commits do not queue behind one write of it per round. A shipper killed in between
sends what it sent since again, with the same span ids."""
RUNS_KEPT = 8192
"""Runs whose ids a shipper keeps from round to round (all forgotten past this many)."""
NICE = 10
"""The shipper's niceness: when the cores are busy, the worker runs first and the shipper
catches up when they are not (the spans wait in the store meanwhile)."""


class Shipper:
    """Exports what a store committed past its cursor for one endpoint, a round at a time."""

    def __init__(self, store: SQLiteStore, exporter: OTLPExporter, sample: float = 1.0,
                 rows: int = ROUND_ROWS) -> None:
        from ._tracing import Tracing

        self.store = store
        self.exporter = exporter
        self.sampled = Tracing(sample=sample).sampled
        self.rows = rows
        self.cursor = self.stored = store.export_cursor(exporter.endpoint, time.time())
        self.saved = time.monotonic()
        # (run id, its stored trace id): (trace id, its span id, sampled), kept from round to
        # round: a run's entries and its end are often read in different rounds
        self.runs: dict[tuple[str, str | None], tuple[str, str, bool]] = {}

    def ship(self) -> int | None:
        """One round: how many rows it went past (0: nothing new), or None when the collector
        could not take them (nothing moved; try again later)."""
        got = self.store.committed_since(self.cursor, self.rows)
        if not (got.entries or got.spans or got.ended):
            # (caught up: keep where; and an idle endpoint is not a stale one)
            if self.cursor != self.stored or time.monotonic() - self.saved > 60:
                self.save()
            return 0
        sampled = self.sampled
        spans = [span for _, span in got.spans if sampled(span.trace_id)]
        runs = self.runs
        if len(runs) > RUNS_KEPT:
            runs.clear()
        described, traces = got.described, got.traces
        for _, run_id, key, kind, name, status, value, started, ended, attempts in got.entries:
            if ended is None or kind == "now":
                continue  # (a pending entry is replaced, with a new rowid, when it ends)
            if described and (run_id, step_span_id(run_id, key)) in described:
                continue  # the stored span is the richer one
            run = runs.get(ids := (run_id, traces.get(run_id)))
            if run is None:
                run = runs[ids] = self._ids(*ids)
            if run[2]:
                spans.append(journal_span(run_id, run[0], run[1], key, kind, name, status,
                                          value, started, ended, attempts))
        for _, record in got.ended:
            run = runs.get(ids := (record.id, record.trace_id))
            if run is None:
                run = runs[ids] = self._ids(*ids)
            if run[2]:
                parent = (child_parent(record.id, record.parent_id) if record.parent_id
                          else None)
                spans.append(run_span(record.id, run[0], record.workflow, parent,
                                      record.tenant, record.created_at,
                                      record.started_at or record.created_at, record.ended_at,
                                      record.status, record.error))
        size = self.exporter.max_batch  # (spans per request; a round may take several)
        for i in range(0, len(spans), size):
            if not self.exporter.deliver(spans[i:i + size]):
                return None  # (requests already taken are sent again: the same span ids)
        journal, stored, ends = self.cursor
        self.cursor = (got.entries[-1][0] if got.entries else journal,
                       got.spans[-1][0] if got.spans else stored,
                       got.ended[-1][0] if got.ended else ends)
        if time.monotonic() - self.saved >= SAVE_EVERY:
            self.save()
        return len(got.entries) + len(got.spans) + len(got.ended)

    def _ids(self, run_id: str, trace_id: str | None) -> tuple[str, str, bool]:
        """A run's trace id (the stored one, else derived), its span's id, and whether its
        trace is sampled."""
        trace_id = trace_id or trace_id_for(run_id)
        return trace_id, run_span_id(run_id), self.sampled(trace_id)

    def save(self) -> None:
        """Write the cursor: what the collector has taken."""
        self.store.save_export_cursor(self.exporter.endpoint, self.cursor, time.time())
        self.stored, self.saved = self.cursor, time.monotonic()


def _lock_path(db: str, endpoint: str) -> Path:
    digest = hashlib.blake2b(endpoint.encode(), digest_size=6).hexdigest()
    return Path(db + "-workers") / f"shipper-{digest}.lock"


def run(settings: dict[str, Any], stopping: threading.Event) -> None:
    """The shipper's life: wait for the endpoint's lock, then ship rounds until ``stopping``
    is set and everything committed is sent (or the collector stays unreachable)."""
    from ..stores.sqlite import SQLiteStore

    exporter = OTLPExporter(settings["endpoint"], headers=settings.get("headers"),
                            resource=settings.get("resource"),
                            compression=settings.get("compression", "gzip"),
                            max_batch=settings.get("max_batch", 512),
                            timeout=settings.get("timeout", 10.0),
                            attempts=settings.get("attempts", 3),
                            backoff=settings.get("backoff", 0.5))
    interval = float(settings.get("interval", 0.2))
    parent = settings.get("parent")
    lock = _lock_path(settings["db"], exporter.endpoint)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        give_up = None
        while True:  # another worker's shipper may hold it: take over when it stops
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not stopping.is_set():
                    stopping.wait(1.0)
                    continue
                # stopping too: the holder may be leaving before this worker's last commits
                give_up = give_up or time.monotonic() + 1.0
                if time.monotonic() > give_up:
                    return  # (what is left goes with the next shipper)
                time.sleep(0.05)
        store = SQLiteStore(settings["db"], durability="process")
        shipper = None
        try:
            shipper = Shipper(store, exporter, settings.get("sample", 1.0))
            failures = 0
            while True:
                if parent is not None and os.getppid() != parent:
                    stopping.set()  # (the worker is gone, though a fork of it holds stdin)
                try:
                    shipped = shipper.ship()
                except Exception:  # (the store busy past its timeout...: the next round)
                    log.exception("span shipper round failed; trying again")
                    shipped = None
                if shipped is None:
                    failures += 1
                    if stopping.is_set() and failures >= 2:
                        log.warning("span shipper stopping with spans not yet sent to %s; "
                                    "they stay in the store for the next one", exporter.endpoint)
                        return
                    stopping.wait(min(30.0, interval * 2 ** failures))
                    continue
                failures = 0
                if shipped:
                    continue
                if stopping.is_set():
                    return
                stopping.wait(interval)
        finally:
            try:
                if shipper is not None and shipper.cursor != shipper.stored:
                    shipper.save()  # (what it sent since its last write)
            except Exception:
                log.exception("span shipper could not save its cursor; what it sent since "
                              "its last save will be sent again")
            finally:
                store.close()
    finally:
        exporter.close(timeout=1.0)
        os.close(fd)  # (releases the lock)


def settings_for(db: str, tracing: Any) -> dict[str, Any]:
    """What a worker passes its shipper: the exporter's settings and the sampling."""
    exporter = tracing.exporter
    return {"db": os.path.abspath(db), "endpoint": exporter.endpoint,
            "headers": {k: v for k, v in exporter.headers.items()
                        if k not in ("Content-Type", "User-Agent", "Content-Encoding")},
            "resource": exporter.resource, "compression": exporter.compression,
            "sample": tracing.sample, "interval": min(exporter.interval, 0.2),
            "max_batch": exporter.max_batch, "timeout": exporter.timeout,
            "attempts": exporter.attempts, "backoff": exporter.backoff,
            "parent": os.getpid()}


class ShipperProcess:
    """A worker's shipper, as a child process."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from corral.observability._shipper import main; main()"],
            stdin=subprocess.PIPE,
            close_fds=True)
        stdin: IO[bytes] | None = self.process.stdin
        assert stdin is not None
        self._stdin = stdin
        stdin.write(json.dumps(settings).encode() + b"\n")
        stdin.flush()  # (stdin stays open: closing it is the signal to stop)

    def exited(self) -> bool:
        """It died, ``RESTART_AFTER`` seconds or more after it started (the worker starts
        another; its spans wait in the store). One that dies sooner is left a while: the
        worker does not start a process a second when something makes them all fail."""
        if time.monotonic() - self.started < RESTART_AFTER:
            return False
        code = self.process.poll()
        if code is not None:
            log.error("span shipper (pid %d) exited with %s; starting another",
                      self.process.pid, code)
            with contextlib.suppress(OSError):
                self._stdin.close()
        return code is not None

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask it to send what is committed and leave; after ``timeout`` (or if the wait is
        cancelled), stop it anyway: what it did not send stays in the store, for the next."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            log.warning("span shipper (pid %d) still sending after %.0f s; stopped, the rest "
                        "goes with the next one", self.process.pid, timeout)
            self.process.kill()
            self.process.wait()
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="corral span shipper: %(message)s")
    settings = json.loads(sys.stdin.buffer.readline())
    stopping = threading.Event()

    def watch() -> None:  # stdin closes: the worker is stopping, or gone
        while sys.stdin.buffer.read(4096):
            pass
        stopping.set()

    threading.Thread(target=watch, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (a Ctrl-C is the worker's to handle)
    with contextlib.suppress(OSError):  # background work: the worker's threads come first
        os.nice(NICE)
    run(settings, stopping)
