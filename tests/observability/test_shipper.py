"""The span shipper: an embedded worker's spans exported from a process of its own, tailing
the store, to a real OTLP/HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _shipper_worker import twice

import corral
from corral._errors import UsageError
from corral.config import Config
from corral.observability import _shipper
from corral.observability._otlp import OTLPExporter
from corral.observability._spans import trace_id_for
from corral.observability._traces import assemble
from corral.observability._tracing import Tracing
from corral.stores import Batch, RunSpec
from corral.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from conftest import Receiver


def runtime(db: Path, url: str, **options: Any) -> corral.Runtime:
    return corral.Runtime(db, poll_interval=0.01, idle_after=0.05, durability="process",
                          tracing=Tracing(exporter=OTLPExporter(url)), **options)


def local_spans(db: Path, run_ids: list[str]) -> list[tuple[str, str, str, str | None]]:
    store = SQLiteStore(str(db))
    try:
        return sorted((s.name, s.trace_id, s.span_id, s.parent_id)
                      for run_id in run_ids for s in assemble(*store.trace(run_id)))
    finally:
        store.close()


def received(receiver: Receiver) -> list[tuple[str, str, str, str | None]]:
    return sorted((s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex() or None)
                  for s in receiver.accepted())


def spans_arrive(receiver: Receiver, count: int, timeout: float = 30.0) -> None:
    with receiver.changed:
        assert receiver.changed.wait_for(lambda: len(receiver.accepted()) >= count, timeout), \
            f"{len(receiver.accepted())} spans arrived, not {count}"


async def test_spans_wait_in_the_store_while_the_collector_is_down(
        tmp_path: Path, receiver: Receiver) -> None:
    """The worker's thread exporter would drop them after its retries; the shipper's cursor
    does not move until the collector takes them."""
    db = tmp_path / "corral.db"
    receiver.answers = [(503, {"Retry-After": "0"}, b"")] * 10_000
    async with runtime(db, receiver.url) as rt:
        handles = [await rt.start(twice, n) for n in range(5)]
        assert [await h.result(timeout=30) for h in handles] == [4 * n for n in range(5)]
    assert receiver.requests and not receiver.accepted()  # it tried, and nothing was taken

    receiver.answers = []  # the collector is back; the next worker's shipper sends them
    async with runtime(db, receiver.url):
        pass
    spans = received(receiver)
    assert Counter(name for name, *_ in spans) == {"invoke_workflow twice": 5, "step double": 10}
    assert len({span_id for _, _, span_id, _ in spans}) == 15  # each once
    assert spans == local_spans(db, [h.id for h in handles])
    assert {trace for _, trace, _, _ in spans} == {trace_id_for(h.id) for h in handles}


async def test_two_workers_on_one_database_send_each_span_once(
        tmp_path: Path, receiver: Receiver) -> None:
    db = tmp_path / "corral.db"
    first, second = runtime(db, receiver.url), runtime(db, receiver.url)
    await first.open()
    try:
        await second.open()
        try:
            handles = [await first.start(twice, n) for n in range(40)]
            assert [await h.result(timeout=30) for h in handles] == [4 * n for n in range(40)]
        finally:
            await first.close()  # its shipper sends what both committed; the other's takes over
            more = [await second.start(twice, n) for n in range(3)]
            assert [await h.result(timeout=30) for h in more] == [0, 4, 8]
    finally:
        await second.close()
    spans = received(receiver)
    assert len(spans) == len({span_id for _, _, span_id, _ in spans}) == 43 * 3
    assert spans == local_spans(db, [h.id for h in handles + more])


async def test_a_batch_the_collector_refuses_for_good_is_not_sent_again(
        tmp_path: Path, receiver: Receiver) -> None:
    db = tmp_path / "corral.db"
    receiver.answers = [(400, {}, b"bad request")]
    async with runtime(db, receiver.url) as rt:
        refused_run = await rt.start(twice, 1)
        assert await refused_run.result(timeout=30) == 4
        await asyncio.to_thread(receiver.wait_for, 1)
        taken = await rt.start(twice, 2)
        assert await taken.result(timeout=30) == 8
    # the refused request's spans never come again; the rest of the first run's (if its
    # spans were committed in two rounds) and all of the second's are taken, each once
    refused = {s.span_id.hex() for s in receiver.requests[0][2].resource_spans[0]
               .scope_spans[0].spans}
    sent = received(receiver)
    assert refused and not refused & {span_id for _, _, span_id, _ in sent}
    assert set(local_spans(db, [taken.id])) <= set(sent) <= set(
        local_spans(db, [refused_run.id, taken.id]))
    assert len(sent) == len(set(sent))
    assert receiver.requests[0][0] == 400
    assert {status for status, _, _ in receiver.requests[1:]} == {200}


async def test_export_from_the_workers_thread_is_a_setting(tmp_path: Path) -> None:
    config = Config(sections={"observability": {"tracing": {
        "otlp_endpoint": "http://127.0.0.1:4318", "export": "thread"}}})
    tracing = Tracing.from_config(config, env={})
    assert tracing.export_from == "thread"
    assert Tracing.from_config(Config(sections={}), env={}).export_from == "process"
    with pytest.raises(UsageError, match=r"'process' .* or 'thread'"):
        Tracing.from_config(Config(sections={"observability": {"tracing": {
            "export": "batch"}}}), env={})


async def test_a_killed_workers_shipper_sends_what_it_committed_and_leaves(
        tmp_path: Path, receiver: Receiver) -> None:
    """kill -9 closes the shipper's stdin as a clean stop does: it sends, then exits."""
    db = tmp_path / "corral.db"
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_shipper_worker.py")), str(db),
         receiver.url, "5"], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        with worker.stdout:
            *run_ids, shipper = (await asyncio.to_thread(worker.stdout.readline)).split()
        assert len(run_ids) == 5, f"the worker said {run_ids!r}"
    finally:
        worker.kill()
        worker.wait()
    spans_arrive(receiver, 15)
    spans = received(receiver)
    assert len(spans) == len({span_id for _, _, span_id, _ in spans}) == 15
    assert spans == local_spans(db, run_ids)

    def gone() -> bool:  # (exited: no process, or a zombie nobody reaped)
        try:
            status = Path(f"/proc/{shipper}/status").read_text()
        except FileNotFoundError:
            return True
        return "\nState:\tZ" in status

    deadline = time.monotonic() + 30
    while not gone():
        assert time.monotonic() < deadline, "the shipper outlived its worker by 30 s"
        await asyncio.sleep(0.05)


async def test_a_shipper_that_dies_is_started_again_and_loses_nothing(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shipper, "RESTART_AFTER", 0.0)
    db = tmp_path / "corral.db"
    async with runtime(db, receiver.url) as rt:
        assert rt._shipper is not None
        first = rt._shipper.process
        first.kill()
        await asyncio.to_thread(first.wait)
        handles = [await rt.start(twice, n) for n in range(5)]  # (committed with none running)
        assert [await h.result(timeout=30) for h in handles] == [4 * n for n in range(5)]
        # the next shipper, started by the worker, sends them (waited for off the loop,
        # which the worker needs)
        await asyncio.to_thread(spans_arrive, receiver, 15)
        assert rt._shipper.process is not first
    spans = received(receiver)
    assert len(spans) == len({span_id for _, _, span_id, _ in spans}) == 15
    assert spans == local_spans(db, [h.id for h in handles])


def test_run_ends_are_kept_until_every_endpoint_has_sent_them(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "corral.db")
    try:
        store.log_ends = True
        a, b = "http://a/v1/traces", "http://b/v1/traces"
        assert store.export_cursor(a, 1.0) == store.export_cursor(b, 1.0) == (0, 0, 0)
        store.apply(Batch(submits=[RunSpec(id=f"r{n}", workflow="w", ref="m:w", input="1",
                                           input_hash="h", run_at=0.0) for n in range(4)]), 2.0)
        store.apply(Batch(finished=[(f"r{n}", "completed", "1", None, 3.0)
                                    for n in range(4)]), 3.0)
        store.save_export_cursor(a, (0, 0, 4), 4.0)  # a has sent the four, b none
        assert [seq for seq, _ in store.committed_since((0, 0, 0), 10).ended] == [1, 2, 3, 4]
        store.save_export_cursor(b, (0, 0, 2), 5.0)  # b has sent two: those two are dropped
        assert [seq for seq, _ in store.committed_since((0, 0, 0), 10).ended] == [2, 3, 4]
        # b not exported to for over a week: it no longer holds a's, and starts at the end
        store.save_export_cursor(a, (0, 0, 4), 5.0 + 8 * 86400)
        assert [seq for seq, _ in store.committed_since((0, 0, 0), 10).ended] == [4]
        assert store.export_cursor(b, 6.0 + 8 * 86400) == (0, 0, 4)
    finally:
        store.close()
