"""Decision records: an RFC 6962 Merkle log in SQLite or PostgreSQL, whose proofs check offline
and whose verification names the first record that was changed, deleted, moved or inserted."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import cli
from corral._errors import StoreError, UsageError
from corral.governance import _merkle as merkle
from corral.governance._records import (
    DecisionLog,
    DecisionRecord,
    TreeHead,
    generate_key_file,
    leaf_data,
    raw_public_key,
    verify_proof,
)
from corral.stores._migrations import connect, is_postgres, upgrade

# -- the tree, against RFC 6962's definitions written out recursively ---------------------------


def mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) <= 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    if m == len(leaves):
        return [] if complete else [mth(leaves)]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m <= k:
        return [*subproof(m, leaves[:k], complete), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def test_roots_and_proofs_match_rfc_6962_for_every_size_index_and_pair_up_to_70() -> None:
    data = [b"leaf %d" % i for i in range(70)]
    hashes = [merkle.leaf_hash(d) for d in data]
    tree = merkle.CompactRange()
    assert tree.root() == mth([]) == merkle.EMPTY_ROOT
    for n in range(1, 71):
        tree.append(hashes[n - 1])
        leaves, subtrees = data[:n], merkle.from_leaves(hashes[:n])
        assert tree.root() == merkle.root(hashes[:n]) == mth(leaves)
        assert merkle.CompactRange.from_bytes(n, tree.to_bytes()).root() == tree.root()
        for i in range(n):
            proof = merkle.inclusion_proof(i, n, subtrees)
            assert proof == path(i, leaves)
            assert merkle.verify_inclusion(hashes[i], i, n, proof, mth(leaves))
            assert not merkle.verify_inclusion(hashes[(i + 1) % n], i, n, proof, mth(leaves)) \
                or n == 1
        for m in range(n + 1):
            proof = merkle.consistency_proof(m, n, subtrees)
            assert proof == (subproof(m, leaves, True) if 0 < m < n else [])
            assert merkle.verify_consistency(m, n, mth(data[:m]), mth(leaves), proof)
            if 0 < m < n:
                assert not merkle.verify_consistency(m, n, mth(data[1:m + 1]), mth(leaves),
                                                     proof)
                assert not merkle.verify_consistency(m, n, mth(data[:m]), mth(data[1:n + 1]),
                                                     proof)


def test_a_compact_range_reports_each_subtree_it_completes() -> None:
    hashes = [merkle.leaf_hash(b"%d" % i) for i in range(64)]
    tree = merkle.CompactRange()
    completed = [node for h in hashes for node in tree.append(h)]
    assert len(completed) == 63
    subtrees = merkle.from_leaves(hashes)
    assert all(node == subtrees(level, index) for level, index, node in completed)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=6), min_size=2, max_size=300), st.data())
def test_changing_any_byte_of_a_proof_breaks_it(leaves: list[bytes], data: st.DataObject
                                               ) -> None:
    hashes = [merkle.leaf_hash(x) for x in leaves]
    n, subtrees = len(hashes), merkle.from_leaves(hashes)
    i = data.draw(st.integers(0, n - 1))
    m = data.draw(st.integers(1, n - 1))
    inclusion = merkle.inclusion_proof(i, n, subtrees)
    consistency = merkle.consistency_proof(m, n, subtrees)
    root, old = merkle.root(hashes), merkle.root(hashes[:m])
    assert merkle.verify_inclusion(hashes[i], i, n, inclusion, root)
    assert merkle.verify_consistency(m, n, old, root, consistency)
    def check_inclusion(proof: list[bytes]) -> bool:
        return merkle.verify_inclusion(hashes[i], i, n, proof, root)

    def check_consistency(proof: list[bytes]) -> bool:
        return merkle.verify_consistency(m, n, old, root, proof)

    for proof, check in ((inclusion, check_inclusion), (consistency, check_consistency)):
        if not proof:
            continue
        at = data.draw(st.integers(0, len(proof) - 1))
        byte = data.draw(st.integers(0, 31))
        changed = list(proof)
        changed[at] = changed[at][:byte] + bytes([changed[at][byte] ^ 1]) + changed[at][byte + 1:]
        assert not check(changed)
        assert not check(proof[:-1])
        assert not check([*proof, proof[0]])


# -- records --------------------------------------------------------------------------------


def test_a_record_is_canonical_json_and_refuses_what_is_not_json() -> None:
    record = DecisionRecord(kind="policy_decision", tenant="acme", agent="support",
                            agent_version="1.2", acting_for="user-7", inputs={"b": 1, "a": "é"},
                            decision="deny", rule="pii.export", trace_id="t1", span_id="s1")
    body = record.canonical()
    assert b" " not in body.replace(b"policy_decision", b"")
    parsed = json.loads(body)
    assert list(parsed) == sorted(parsed) and list(parsed["inputs"]) == ["a", "b"]
    assert "é".encode() in body
    assert DecisionRecord.from_dict(parsed).canonical() == body
    with pytest.raises(UsageError, match="not JSON"):
        DecisionRecord(kind="tool_call", tenant="acme", inputs={"x": object()}).canonical()
    with pytest.raises(UsageError, match="kind is one of"):
        DecisionRecord(kind="guess", tenant="acme")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="tenant"):
        DecisionRecord(kind="tool_call", tenant="")


# -- the log ----------------------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "signing.pem"
    generate_key_file(path)
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = (str(tmp_path / "corral.db") if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    upgrade(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = str(tmp_path / "corral.db")
    upgrade(url)
    return url


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = connect(url)
    try:
        cur = conn.cursor()
        cur.execute(statement.replace("?", "%s") if is_postgres(url) else statement, params)
        rows = list(cur.fetchall()) if cur.description else []
        conn.commit()
        return rows
    finally:
        conn.close()


def record(i: int, kind: str = "model_call") -> DecisionRecord:
    return DecisionRecord(kind=kind, tenant="acme", agent="support", agent_version="3",  # type: ignore[arg-type]
                          acting_for="user-1", inputs={"question": f"order {i}?"},
                          prompt="Answer briefly.", prompt_version="v2", model="gpt-x",
                          tools=[{"name": "lookup", "arguments": {"order": i}}],
                          outputs={"answer": f"shipped {i}"}, decision="answered",
                          rule="default", trace_id=f"trace-{i}", span_id=f"span-{i}")


async def fill(decisions: DecisionLog, batches: tuple[int, ...] = (100, 100, 100)) -> list[str]:
    """Append ``batches`` of records, each written as one batch (one signed head each)."""
    ids: list[str] = []
    for size in batches:
        for _ in range(size):
            ids.append(decisions.append(record(len(ids))))
        await decisions.flush()
    return ids


async def test_appended_records_verify_prove_and_export_on_sqlite_and_postgresql(
        url: str, key_file: Path) -> None:
    async with DecisionLog(url, signing_key=key_file, batch=64) as decisions:
        ids = await fill(decisions, (300, 1, 700))
        heads = decisions.heads()
        assert [h.size for h in heads][-1] == 1001 and len(heads) >= 3
        result = decisions.verify()
        assert result.ok and result.records == 1001 and result.heads == len(heads)
        assert result.root == heads[-1].root.hex()
        for i in (0, 255, 256, 300, 1000):
            proof = decisions.prove(ids[i])
            assert proof["index"] == i and proof["tree_head"]["size"] == 1001
            assert json.loads(proof["leaf"])["record"]["trace_id"] == f"trace-{i}"
            assert verify_proof(json.loads(json.dumps(proof)),
                                [decisions.public_key()]).ok
        older = decisions.prove(ids[5], size=heads[1].size)
        assert verify_proof(older).ok and older["tree_head"]["size"] == heads[1].size
        for old, new in itertools.pairwise(heads):
            assert verify_proof(decisions.consistency(old.size, new.size)).ok
        out = io.BytesIO()
        assert decisions.export(out) == 1001
    # an auditor recomputes every signed root from the export, with the header's public key
    lines = out.getvalue().splitlines()
    header = json.loads(lines[0])
    (public,) = [base64.b64decode(k) for k in header["public_keys"].values()]
    leaves: list[bytes] = []
    checked = 0
    for line in lines[1:]:
        if line.startswith(b'{"tree_head"'):
            head = TreeHead.from_json(json.loads(line)["tree_head"])
            assert head.size == len(leaves) and head.verify(public)
            assert head.root == merkle.root(leaves)
            checked += 1
        else:
            assert json.loads(line)["index"] == len(leaves)
            leaves.append(merkle.leaf_hash(line))
    assert checked == len(heads) and len(leaves) == 1001


async def test_several_writer_processes_on_postgresql_extend_one_tree(pg_url: str,
                                                                      key_file: Path) -> None:
    upgrade(pg_url)
    writer = f"""
import asyncio, sys
from corral.governance._records import DecisionLog, DecisionRecord

async def main() -> None:
    async with DecisionLog({pg_url!r}, signing_key={str(key_file)!r}, batch=40) as log:
        for burst in range(10):
            for i in range(50):
                print(log.append(DecisionRecord(kind="tool_call", tenant="acme",
                                                agent=sys.argv[1], inputs={{"i": i}})))
            await log.flush()

asyncio.run(main())
"""
    processes = [subprocess.Popen([sys.executable, "-c", writer, f"writer-{n}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for n in range(4)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], [e for _, e in outputs]
    written = [line for out, _ in outputs for line in out.split()]
    assert len(written) == len(set(written)) == 2000
    stored = [r[0] for r in sql(pg_url, "SELECT id FROM corral_decision_records ORDER BY idx")]
    assert sorted(stored) == sorted(written)
    assert sql(pg_url, "SELECT min(idx), max(idx), count(*) FROM corral_decision_records") \
        == [(0, 1999, 2000)]
    decisions = DecisionLog(pg_url, signing_key=key_file)
    result = decisions.verify()
    assert result.ok and result.records == 2000, result.problem
    heads = decisions.heads()
    assert len(heads) >= 4 * 10 and heads[-1].size == 2000
    for old, new in itertools.pairwise(heads):
        assert verify_proof(decisions.consistency(old.size, new.size)).ok
    await decisions.close()


# -- tampering: each kind found, and the right record named -----------------------------------


@pytest.fixture
async def tampered(url: str, key_file: Path) -> tuple[str, DecisionLog, list[str]]:
    decisions = DecisionLog(url, signing_key=key_file)
    ids = await fill(decisions)
    await decisions.close()
    assert decisions.verify().ok
    return url, decisions, ids


Tampered = tuple[str, DecisionLog, list[str]]


def test_changing_one_byte_of_a_record_names_it(tampered: Tampered) -> None:
    url, decisions, ids = tampered
    (data,) = sql(url, "SELECT data FROM corral_decision_records WHERE idx = 150")[0]
    data = bytes(data).replace(b"shipped 150", b"shipped 151")
    sql(url, "UPDATE corral_decision_records SET data = ? WHERE idx = 150", (data,))
    result = decisions.verify()
    assert not result.ok and (result.index, result.record_id) == (150, ids[150])
    assert "changed after it was written" in str(result.problem)


def test_changing_a_record_and_its_hash_breaks_the_signed_head_of_its_batch(
        tampered: Tampered) -> None:
    url, decisions, _ = tampered
    (data,) = sql(url, "SELECT data FROM corral_decision_records WHERE idx = 150")[0]
    data = bytes(data).replace(b'"decision":"answered"', b'"decision":"refused"')
    sql(url, "UPDATE corral_decision_records SET data = ?, hash = ? WHERE idx = 150",
        (data, merkle.leaf_hash(data)))
    result = decisions.verify()
    assert not result.ok and result.index == 100
    assert "records #100..#199 do not reproduce signed tree head 200" in str(result.problem)


def test_deleting_a_record_names_it(tampered: Tampered) -> None:
    url, decisions, _ = tampered
    sql(url, "DELETE FROM corral_decision_records WHERE idx = 42")
    result = decisions.verify()
    assert not result.ok and result.index == 42 and "#42 is missing" in str(result.problem)


def test_deleting_a_record_and_renumbering_the_rest_names_the_first_moved(
        tampered: Tampered) -> None:
    url, decisions, ids = tampered
    sql(url, "DELETE FROM corral_decision_records WHERE idx = 42")
    sql(url, "UPDATE corral_decision_records SET idx = idx + 1000000 WHERE idx > 42")
    sql(url, "UPDATE corral_decision_records SET idx = idx - 1000001 WHERE idx > 1000000")
    result = decisions.verify()
    assert not result.ok and (result.index, result.record_id) == (42, ids[43])
    assert "was written as #43" in str(result.problem)


def test_deleting_the_last_records_is_found_by_the_last_signed_head(
        tampered: Tampered) -> None:
    url, decisions, _ = tampered
    sql(url, "DELETE FROM corral_decision_records WHERE idx >= 290")
    result = decisions.verify()
    assert not result.ok and result.index == 290
    assert "records #290..#299 are missing" in str(result.problem)


def test_reordering_two_records_names_the_first_moved(tampered: Tampered) -> None:
    url, decisions, ids = tampered
    sql(url, "UPDATE corral_decision_records SET idx = -1 WHERE idx = 120")
    sql(url, "UPDATE corral_decision_records SET idx = 120 WHERE idx = 130")
    sql(url, "UPDATE corral_decision_records SET idx = 130 WHERE idx = -1")
    result = decisions.verify()
    assert not result.ok and (result.index, result.record_id) == (120, ids[130])
    assert "was written as #130" in str(result.problem)


def test_inserting_a_forged_record_names_it(tampered: Tampered) -> None:
    url, decisions, _ = tampered
    forged = DecisionRecord(kind="human_override", tenant="acme", decision="approve",
                            acting_for="mallory")
    data = leaf_data(150, forged.canonical())
    sql(url, "UPDATE corral_decision_records SET idx = idx + 1000000 WHERE idx >= 150")
    sql(url, "UPDATE corral_decision_records SET idx = idx - 999999 WHERE idx > 1000000")
    sql(url, "INSERT INTO corral_decision_records (idx, id, data, hash) VALUES (?, ?, ?, ?)",
        (150, forged.id, data, merkle.leaf_hash(data)))
    result = decisions.verify()
    assert not result.ok and (result.index, result.record_id) == (150, forged.id)
    assert "was inserted" in str(result.problem)


def test_appending_a_record_outside_the_log_is_found(tampered: Tampered) -> None:
    url, decisions, _ = tampered
    forged = DecisionRecord(kind="policy_decision", tenant="acme", decision="allow")
    data = leaf_data(300, forged.canonical())
    sql(url, "INSERT INTO corral_decision_records (idx, id, data, hash) VALUES (?, ?, ?, ?)",
        (300, forged.id, data, merkle.leaf_hash(data)))
    result = decisions.verify()
    assert not result.ok and result.index == 300
    assert "not covered by a signed tree head" in str(result.problem)


def test_a_changed_tree_head_or_node_is_found(tampered: Tampered) -> None:
    url, decisions, _ = tampered
    sql(url, "UPDATE corral_decision_heads SET at_ms = at_ms + 1 WHERE size = 200")
    result = decisions.verify()
    assert not result.ok and result.index == 100 and "bad signature" in str(result.problem)
    sql(url, "UPDATE corral_decision_heads SET at_ms = at_ms - 1 WHERE size = 200")
    sql(url, "UPDATE corral_decision_nodes SET hash = ? WHERE level = 8 AND idx = 0",
        (b"\x00" * 32,))
    result = decisions.verify()
    assert not result.ok and result.index == 0
    assert "tree node over records #0..#255" in str(result.problem)


async def test_heads_signed_by_another_key_are_not_trusted(sqlite_url: str, key_file: Path,
                                                           tmp_path: Path) -> None:
    async with DecisionLog(sqlite_url, signing_key=key_file) as decisions:
        await fill(decisions, (10,))
    other = raw_public_key(generate_key_file(tmp_path / "other.pem"))
    result = DecisionLog(sqlite_url, public_keys=[other]).verify()
    assert not result.ok and "not by a trusted key" in str(result.problem)


# -- writing: off the event loop, failures kept, keys ---------------------------------------------


async def test_append_queues_while_the_database_is_locked_and_writes_after(
        sqlite_url: str, key_file: Path) -> None:
    lock = connect(sqlite_url)
    lock.execute("BEGIN EXCLUSIVE")  # (another process writing: appends must not wait for it)
    decisions = DecisionLog(sqlite_url, signing_key=key_file, flush_every=0.0)
    ids = [decisions.append(record(i)) for i in range(20)]
    await asyncio.sleep(0)  # the event loop runs on
    lock.execute("COMMIT")
    lock.close()
    await decisions.close()
    assert [r[0] for r in sql(sqlite_url, "SELECT id FROM corral_decision_records "
                                          "ORDER BY idx")] == ids


async def test_a_failed_write_is_reported_kept_and_retried(sqlite_url: str,
                                                           key_file: Path) -> None:
    sql(sqlite_url, "ALTER TABLE corral_decision_heads RENAME TO heads_away")
    decisions = DecisionLog(sqlite_url, signing_key=key_file, flush_every=0.0)
    ids = [decisions.append(record(i)) for i in range(5)]
    with pytest.raises(StoreError, match=r"5 could not be written .* they stay queued"):
        await decisions.flush()
    sql(sqlite_url, "ALTER TABLE heads_away RENAME TO corral_decision_heads")
    await decisions.close()
    assert decisions.verify().ok
    assert [r[0] for r in sql(sqlite_url, "SELECT id FROM corral_decision_records "
                                          "ORDER BY idx")] == ids
    with pytest.raises(UsageError, match="closed"):
        decisions.append(record(6))


async def test_the_embedded_database_gets_a_signing_key_beside_it(
        sqlite_url: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_SIGNING_KEY", raising=False)
    async with DecisionLog(sqlite_url) as decisions:
        decisions.append(record(0))
    key = Path(sqlite_url).parent / "decision-log.key"
    assert key.exists() and key.stat().st_mode & 0o777 == 0o600
    assert "generated the signing key" in caplog.text and str(key) in caplog.text
    assert DecisionLog(sqlite_url).verify().ok  # (the same key, read back)


def test_postgresql_needs_a_configured_key(pg_url: str, key_file: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    upgrade(pg_url)
    monkeypatch.delenv("CORRAL_SIGNING_KEY", raising=False)
    with pytest.raises(UsageError, match="one signing key shared by every writer"):
        DecisionLog(pg_url).append(record(0))
    with pytest.raises(UsageError, match="needs its public key: pass --public-key"):
        DecisionLog(pg_url).verify()
    monkeypatch.setenv("CORRAL_SIGNING_KEY", key_file.read_text())
    assert DecisionLog(pg_url).public_key() == DecisionLog(pg_url,
                                                           signing_key=key_file).public_key()


def test_a_log_needs_its_tables(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="corral db upgrade"):
        DecisionLog(str(tmp_path / "empty.db"))


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def audited(tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[str, list[str]]]:
    db = str(tmp_path / "corral.db")
    upgrade(db)
    (tmp_path / "corral.toml").write_text(f'database = "{db}"\n\n[governance]\n'
                                          f'signing_key = "{key_file}"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORRAL_SIGNING_KEY", raising=False)
    monkeypatch.delenv("CORRAL_DATABASE_URL", raising=False)
    monkeypatch.delenv("CORRAL_CONFIG", raising=False)

    async def write() -> list[str]:
        async with DecisionLog(db, signing_key=key_file) as decisions:
            return await fill(decisions, (40, 2))

    yield db, asyncio.run(write())


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verify_prove_and_check_offline(audited: tuple[str, list[str]], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    db, ids = audited
    code, out, _ = run(capsys, "audit", "verify")
    assert code == 0 and out.startswith("ok: 42 decision records and 2 signed tree heads")
    code, out, _ = run(capsys, "audit", "verify", "--json")
    assert code == 0 and json.loads(out)["records"] == 42
    assert run(capsys, "audit", "prove", ids[7], "--out", "proof.json")[0] == 0
    assert run(capsys, "audit", "public-key", "--out", "log.pub")[0] == 0
    assert run(capsys, "audit", "consistency", "40", "--out", "grew.json")[0] == 0
    Path(db).unlink()  # offline: the proofs need nothing but themselves
    (tmp_path / "corral.toml").unlink()
    code, out, _ = run(capsys, "audit", "verify-proof", "proof.json", "--public-key", "log.pub")
    assert code == 0 and out.startswith(f"ok: record {ids[7]} (#7) is in the log's tree of 42")
    code, out, _ = run(capsys, "audit", "verify-proof", "grew.json")
    assert code == 0 and "tree of 42 records extends its tree of 40" in out


def test_cli_bad_inputs_get_clear_errors(audited: tuple[str, list[str]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _, ids = audited
    code, _, err = run(capsys, "audit", "prove", "dr_nope")
    assert code == 2 and err == "error: no decision record 'dr_nope'; `corral audit export` " \
                                "lists them\n"
    assert run(capsys, "audit", "prove", ids[3], "--out", "proof.json")[0] == 0
    proof = json.loads(Path("proof.json").read_text())
    Path("cut.json").write_text(Path("proof.json").read_text()[:200])
    code, _, err = run(capsys, "audit", "verify-proof", "cut.json")
    assert code == 2 and err.startswith("error: cut.json is not JSON")
    proof["audit_path"][0] = "00" * 32
    Path("forged.json").write_text(json.dumps(proof))
    code, _, err = run(capsys, "audit", "verify-proof", "forged.json")
    assert code == 1 and "does not verify" in err and "audit path does not lead" in err
    proof = json.loads(Path("proof.json").read_text())
    proof["leaf"] = proof["leaf"].replace("shipped 3", "shipped 4")
    Path("forged.json").write_text(json.dumps(proof))
    code, _, err = run(capsys, "audit", "verify-proof", "forged.json")
    assert code == 1 and "the leaf does not match its leaf hash" in err
    del proof["tree_head"]
    Path("forged.json").write_text(json.dumps(proof))
    code, _, err = run(capsys, "audit", "verify-proof", "forged.json")
    assert code == 2 and "'tree_head'" in err
    code, _, err = run(capsys, "audit", "verify-proof", "missing.json")
    assert code == 2 and "cannot read the proof missing.json" in err
    other = tmp_path / "other.pem"
    generate_key_file(other)
    code, _, err = run(capsys, "audit", "keygen", "--out", str(other))
    assert code == 2 and "never overwrites" in err


def test_cli_verify_names_the_first_bad_record_and_export_writes_json_lines(
        audited: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    db, ids = audited
    assert run(capsys, "audit", "export", "--out", "log.jsonl")[0] == 0
    lines = Path("log.jsonl").read_bytes().splitlines()
    assert len(lines) == 1 + 42 + 2 and json.loads(lines[1])["record"]["id"] == ids[0]
    sql(db, "UPDATE corral_decision_records SET data = ? WHERE idx = 9",
        (lines[10].replace(b"shipped 9", b"shipped 0"),))
    code, _, err = run(capsys, "audit", "verify")
    assert code == 1 and f"record #9 ({ids[9]}) does not match its leaf hash" in err
    code, out, _ = run(capsys, "audit", "verify", "--json")
    assert code == 1 and (json.loads(out)["index"], json.loads(out)["record_id"]) == (9, ids[9])
