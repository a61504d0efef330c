"""PII redaction: precision, recall and F2 per entity type, and sentences per second, for
corral's `Redactor` and Presidio's pattern recognizers side by side on the same corpus in the
same run.

The data, bench/data/pii_corpus.jsonl (made by bench/data/make_pii_corpus.py): 1,398 texts
with every piece of PII labelled by type: one identifier per sentence in many formats and
contexts, mixed messages (chat, tickets, log lines, JSON, config, signatures, CSV), near
misses (cards failing Luhn, IBANs with a wrong checksum or length, SSNs in invalid ranges,
dates, versions, order numbers, ISBNs, amounts, MAC addresses, identifiers, UUIDs, hashes,
templated passwords), plain negatives, names and addresses, and a ``holdout`` group of 83
texts written by hand after the rules were settled, reported apart as well.

Scoring. A prediction matches a labelled span of the same type when their intersection over
union is at least 0.5 (one to one, best overlap first); exact-boundary figures are in the JSON
line too. F2 weighs recall twice as much as precision: a missed identifier leaks, a spurious
one only hides a few characters. Structured types are EMAIL, PHONE, CREDIT_CARD, IBAN,
US_SSN, IP_ADDRESS (the six both tools find) and SECRET (corral only: Presidio has no
recognizer for keys and tokens). PERSON and ADDRESS are scored for corral's ``ner="rules"``
fallback alone (Presidio finds them only with a spaCy model, which cannot be installed here).

Throughput. corral: ``Redactor().redact(text)`` (every structured type, secrets included) over
the whole corpus, several passes. Presidio (bench/peers/presidio_pii.py, in its own venv:
``AnalyzerEngine`` with its six predefined recognizers and a tokenizer-only spaCy pipeline,
no NER): ``analyze(text)`` over the whole corpus once. The two alternate ``--rounds`` times in
one run (the machine is shared, so a ratio measured in alternation is the stable figure);
the median of each is reported, with their ratio. Rates are per CPU second of the measuring
process (``time.process_time``), which other work on a shared machine does not distort, and
per wall-clock second beside them.

    python bench/pii.py [--rounds 3] [--no-peer] [--presidio-python PATH]

Prints a table, then one JSON line with everything in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.governance._pii import NER_ENTITIES, STRUCTURED_ENTITIES, Redactor

HERE = Path(__file__).parent
DATA = HERE / "data" / "pii_corpus.jsonl"
PEER = HERE / "peers" / "presidio_pii.py"
PRESIDIO_VENV = Path("/work/venvs/presidio")
PRESIDIO_TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "US_SSN", "IP_ADDRESS")
TYPES = STRUCTURED_ENTITIES + NER_ENTITIES
CORRAL_PASSES = 10  # corpus passes per corral round: a round lasts about as long as Presidio's

Span = tuple[int, int, str]


@dataclass
class Row:
    text: str
    spans: list[Span]
    group: str


def load() -> list[Row]:
    rows = []
    for line in DATA.read_text().splitlines():
        if line.strip():
            raw = json.loads(line)
            rows.append(Row(raw["text"], [(s, e, t) for s, e, t in raw["spans"]], raw["group"]))
    return rows


def iou(a: Span, b: Span) -> float:
    inter = min(a[1], b[1]) - max(a[0], b[0])
    return inter / (max(a[1], b[1]) - min(a[0], b[0])) if inter > 0 else 0.0


def score(rows: list[Row], predictions: list[list[Span]], types: tuple[str, ...],
          exact: bool = False) -> dict[str, dict[str, float]]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for row, predicted in zip(rows, predictions, strict=True):
        gold = [s for s in row.spans if s[2] in types]
        pred = [p for p in predicted if p[2] in types]
        pairs = sorted(((iou(g, p), gi, pi) for gi, g in enumerate(gold)
                        for pi, p in enumerate(pred) if g[2] == p[2]), reverse=True)
        used_g: set[int] = set()
        used_p: set[int] = set()
        for overlap, gi, pi in pairs:
            ok = gold[gi][:2] == pred[pi][:2] if exact else overlap >= 0.5
            if ok and gi not in used_g and pi not in used_p:
                used_g.add(gi)
                used_p.add(pi)
                tp[gold[gi][2]] += 1
        for gi, g in enumerate(gold):
            if gi not in used_g:
                fn[g[2]] += 1
        for pi, p in enumerate(pred):
            if pi not in used_p:
                fp[p[2]] += 1
    out = {t: prf(tp[t], fp[t], fn[t]) for t in types}
    out["micro"] = prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return out


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f2 = 5 * p * r / (4 * p + r) if p + r else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": round(p, 4), "recall": round(r, 4),
            "f2": round(f2, 4)}


class Presidio:
    """The peer process, kept open across rounds."""

    def __init__(self, python: Path) -> None:
        self._proc = subprocess.Popen([str(python), str(PEER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise SystemExit(f"the Presidio peer exited ({self._proc.wait()}); see its stderr")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, **msg: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.ask_quit()

    def ask_quit(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


def presidio_python(given: str | None) -> Path:
    if given:
        return Path(given)
    python = PRESIDIO_VENV / "bin" / "python"
    if not python.exists():
        print(f"making {PRESIDIO_VENV} with presidio-analyzer (once)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PRESIDIO_VENV)], check=True)
        subprocess.run([str(PRESIDIO_VENV / "bin" / "pip"), "install", "--quiet",
                        "presidio-analyzer"], check=True)
    return python


def time_corral(redactor: Redactor, texts: list[str]) -> tuple[float, float]:
    """Texts per CPU second and per wall-clock second."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(CORRAL_PASSES):
        for text in texts:
            redactor.redact(text)
    n = CORRAL_PASSES * len(texts)
    return n / (time.process_time() - cpu), n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip Presidio")
    parser.add_argument("--presidio-python", help="a python with presidio-analyzer installed")
    args = parser.parse_args()

    rows = load()
    texts = [r.text for r in rows]
    holdout = [i for i, r in enumerate(rows) if r.group == "holdout"]
    redactor = Redactor()
    named = Redactor(TYPES, ner="rules")
    corral_pred = [[(f.start, f.end, f.entity) for f in named.detect(t)] for t in texts]

    def sub(preds: list[list[Span]], idx: list[int]) -> tuple[list[Row], list[list[Span]]]:
        return [rows[i] for i in idx], [preds[i] for i in idx]

    result: dict[str, Any] = {
        "bench": "pii", "texts": len(rows), "python": platform.python_version(),
        "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "labelled": dict(Counter(s[2] for r in rows for s in r.spans)),
        "corral": {
            "scores": score(rows, corral_pred, TYPES),
            "scores_presidio_types": score(rows, corral_pred, PRESIDIO_TYPES),
            "scores_exact": score(rows, corral_pred, TYPES, exact=True),
            "holdout": score(*sub(corral_pred, holdout), STRUCTURED_ENTITIES),
        },
    }
    peer = None
    if not args.no_peer:
        peer = Presidio(presidio_python(args.presidio_python))
        spans = peer.ask(cmd="detect", texts=texts)["spans"]
        presidio_pred = [[(s, e, t) for s, e, t, _ in row] for row in spans]
        result["presidio"] = {
            "version": peer.info["version"], "recognizers": peer.info["recognizers"],
            "scores": score(rows, presidio_pred, PRESIDIO_TYPES),
            "scores_exact": score(rows, presidio_pred, PRESIDIO_TYPES, exact=True),
            "holdout": score(*sub(presidio_pred, holdout), PRESIDIO_TYPES),
        }

    corral_cpu: list[float] = []
    corral_wall: list[float] = []
    presidio_cpu: list[float] = []
    presidio_wall: list[float] = []
    time_corral(redactor, texts[:200])  # warm up
    for _ in range(args.rounds):
        cpu, wall = time_corral(redactor, texts)
        corral_cpu.append(cpu)
        corral_wall.append(wall)
        if peer is not None:
            timed = peer.ask(cmd="time", texts=texts, rounds=1)
            presidio_cpu.append(timed["texts"] / timed["cpu_seconds"])
            presidio_wall.append(timed["texts"] / timed["seconds"])
    result["corral"].update(sentences_per_cpu_s=round(statistics.median(corral_cpu)),
                            sentences_per_s=round(statistics.median(corral_wall)),
                            rounds_cpu=[round(r) for r in corral_cpu])
    if peer is not None:
        peer.close()
        result["presidio"].update(sentences_per_cpu_s=round(statistics.median(presidio_cpu), 1),
                                  sentences_per_s=round(statistics.median(presidio_wall), 1),
                                  rounds_cpu=[round(r, 1) for r in presidio_cpu])
        result["throughput_ratio"] = round(statistics.median(
            c / p for c, p in zip(corral_cpu, presidio_cpu, strict=True)), 1)
        result["throughput_ratio_wall"] = round(statistics.median(
            c / p for c, p in zip(corral_wall, presidio_wall, strict=True)), 1)

    report(result)
    print(json.dumps(result))


def report(result: dict[str, Any]) -> None:
    c = result["corral"]["scores"]
    p = result.get("presidio", {}).get("scores", {})
    print(f"PII redaction on {result['texts']} texts "
          f"(match: same type, IoU >= 0.5; F2 weighs recall x2)\n")
    print(f"{'entity':<12} {'labelled':>8} | {'corral P':>8} {'R':>6} {'F2':>6} | "
          f"{'Presidio P':>10} {'R':>6} {'F2':>6}")
    for t in TYPES:
        row = f"{t:<12} {result['labelled'].get(t, 0):>8} | " + cells(c[t], 8)
        row += " | " + (cells(p[t], 10) if t in p else f"{'n/a':>10} {'':>6} {'':>6}")
        if t in NER_ENTITIES:
            row += "   (corral: ner='rules')"
        print(row)
    cp = result["corral"]["scores_presidio_types"]["micro"]
    print(f"{'micro, 6 shared types':<21} | " + cells(cp, 8)
          + (" | " + cells(p["micro"], 10) if p else ""))
    ch = result["corral"]["holdout"]["micro"]
    line = f"{'holdout (83 texts)':<21} | " + cells(ch, 8)
    if p:
        line += " | " + cells(result["presidio"]["holdout"]["micro"], 10)
    print(line + "   (corral incl. SECRET)\n")
    print(f"{'':<10}{'per CPU second':>16} {'per second (wall)':>18}")
    for name, key in (("corral", "corral"), ("Presidio", "presidio")):
        if key in result:
            r = result[key]
            print(f"{name:<10}{r['sentences_per_cpu_s']:>16,} {r['sentences_per_s']:>18,}"
                  f"   sentences; CPU rounds {r['rounds_cpu']}")
    if p:
        print(f"{'ratio':<10}{result['throughput_ratio']:>15}x "
              f"{result['throughput_ratio_wall']:>17}x   (median of per-round ratios; "
              f"Presidio {result['presidio']['version']})\n")


def cells(s: dict[str, float], width: int) -> str:
    return f"{s['precision']:>{width}.3f} {s['recall']:>6.3f} {s['f2']:>6.3f}"


if __name__ == "__main__":
    main()
