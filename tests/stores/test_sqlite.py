"""The SQLite store: large values are stored once, and come back exactly as they went in."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.stores import Batch, RunSpec, SQLiteStore

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=400)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=80)
    | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=200,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "store.db", durability="process")
    yield opened
    opened.close()


def _roundtrip(store: SQLiteStore, run_id: str, value: Any) -> Any:
    text = json.dumps(value)
    batch = Batch()
    batch.journal.append((run_id, "0", "step", "s", "ok", text, 1.0, 2.0, 1))
    store.apply(batch, 3.0)
    (entry,) = store.journal(run_id)
    assert entry.value is not None
    return json.loads(entry.value)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
def test_any_json_value_comes_back_unchanged(store: SQLiteStore, value: Any) -> None:
    assert _roundtrip(store, "run", value) == value


def _stored_bytes(path: Path) -> int:
    with closing(sqlite3.connect(path)) as db, db:
        journal = db.execute("SELECT SUM(LENGTH(value)) FROM journal").fetchone()[0]
        blobs = db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM blobs").fetchone()[0]
    return int(journal + blobs)


def test_a_growing_conversation_is_stored_close_to_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store.db", durability="process")
    message = {"role": "user", "content": "x" * 1000}
    conversation: list[dict[str, Any]] = []
    for turn in range(300):
        conversation.append({**message, "turn": turn})
        batch = Batch()
        batch.journal.append(("run", str(turn), "step", "s", "ok", json.dumps(conversation),
                              1.0, 2.0, 1))
        store.apply(batch, 3.0)
    once = len(json.dumps(conversation))
    # Whole conversation at every step would be ~150 times `once`; chunks keep it near 2x.
    assert _stored_bytes(tmp_path / "store.db") < 3 * once
    last = {entry.key: entry for entry in store.journal("run")}["299"]
    store.close()
    assert json.loads(last.value or "") == conversation


def test_a_file_that_is_not_a_corral_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE customers (id INTEGER)")
    before = path.read_bytes()
    with pytest.raises(Exception, match="is not a corral database"):
        SQLiteStore(path)
    assert path.read_bytes() == before


def _spec(run_id: str, **fields: Any) -> RunSpec:
    return RunSpec(id=run_id, workflow="w", ref="m:w", input="null", input_hash="h",
                   run_at=0.0, **fields)


def test_a_file_holding_only_the_shared_records_takes_runs_too(tmp_path: Path) -> None:
    """`corral db upgrade` (or `corral keys create`) first, then runs, in one embedded file."""
    from corral.stores._migrations import upgrade

    path = str(tmp_path / "corral.db")
    upgrade(path)
    store = SQLiteStore(path)
    store.apply(Batch(submits=[_spec("r")]), 1.0)
    assert store.get_run("r").status == "queued"
    store.close()


def test_a_child_started_after_its_parent_was_asked_to_stop_is_asked_too(
    store: SQLiteStore,
) -> None:
    store.apply(Batch(submits=[_spec("parent")]), 1.0)
    store.request_cancel("parent", 2.0)
    store.apply(Batch(submits=[_spec("child", parent_id="parent")]), 3.0)
    assert store.get_run("child").cancel_requested


def test_runs_blocked_by_a_full_concurrency_key_do_not_starve_the_others(
    store: SQLiteStore,
) -> None:
    limited = [_spec(f"t{i}", priority=9, concurrency_key="tenant", concurrency_limit=1)
               for i in range(40)]
    store.apply(Batch(submits=[*limited, _spec("free", priority=0)]), 1.0)
    (first,) = store.claim("w1", ["default"], 1, 2.0)  # takes the tenant's one slot
    assert first.run.concurrency_key == "tenant"
    (second,) = store.claim("w1", ["default"], 1, 2.0)
    assert second.run.id == "free"


def test_a_reader_sees_commits_and_does_not_wait_behind_a_writer(store: SQLiteStore) -> None:
    """`corral serve` reads through one: a GET must not queue behind a commit's fsync."""
    from corral._errors import StoreError

    reader = store.reader()
    try:
        store.apply(Batch(submits=[_spec("r")]), 1.0)
        assert reader.get_run("r").status == "queued"  # the writer's commit, seen
        with store._tx() as db:  # the writer in the middle of a transaction, lock held
            db.execute("UPDATE runs SET status = 'running' WHERE id = 'r'")
            assert reader.get_run("r").status == "queued"  # answered now, the last commit
        assert reader.get_run("r").status == "running"
        with pytest.raises(StoreError, match="only reads"):
            reader.apply(Batch(submits=[_spec("s")]), 2.0)
    finally:
        reader.close()
    assert store.get_run("r").status == "running"  # (closing the reader leaves the store open)
