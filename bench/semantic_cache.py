"""The semantic cache: how often it answers a paraphrase, how often a served answer is wrong,
and how long a lookup takes among 100,000 entries. Both embedders, side by side.

The data, bench/data/paraphrases.jsonl: 359 base questions in 11 domains (support, billing,
travel, coding, HR, finance, shopping, devops, health, home, general), each with true
paraphrases (719 in all: reworded, shortened, lowercased) and hard negatives (715) that read
alike but must not get its answer, labelled ``number`` (other amounts, dates, sizes),
``negation`` (not/never/without added), ``reversed`` (the opposite: enable/disable, buy/sell,
earlier/later), ``entity`` (another name, product, place or thing) and ``direction``
(from X to Y against from Y to X; X faster than Y against Y faster than X).

Method. The cache holds every base question (one tenant, one scope). The bases are split at
random (seed 7) into a tune half and a test half; each query is a paraphrase or a negative of
its half's bases. A paraphrase's hit is right when it serves its own base's answer; a
negative's hit is always wrong. Each embedder's threshold is chosen on the tune half alone
(the lowest at which tune precision is at least ``--target`` at that threshold and every one
above it), then the test half is measured at that threshold with the real `SemanticCache`
(top 5 candidates, the guard). Beside it, on the same test half: plain cosine similarity
without the guard at the same threshold (what GPTCache's default similarity evaluation does:
serve the nearest entry above the threshold), and cosine only at the threshold the tune half
would need for the same precision without a guard.

Latency. One partition of 100,000 entries: the bases plus synthetic questions from
templates. Hashing embeds all of them. MiniLM embeds 2,000 synthetic questions (embedding
100,000 would take ten minutes on 2 cores) and fills the rest with 49 randomly rotated
copies of them: the same geometry among themselves, unrelated to the queries, as unrelated
questions are. Every test query is looked up once (timed: the whole `lookup`, embedding
included), then again with its embedding already made (timed: search and guard alone).

    python bench/semantic_cache.py [--embedders hashing minilm] [--entries 100000]

Prints a table, then one JSON line with everything in it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from corral.gateway._embeddings import Embedder, embedder
from corral.gateway._guard import differs
from corral.gateway._semantic import DEFAULT_CANDIDATES, DEFAULT_THRESHOLDS, SemanticCache

DATA = Path(__file__).parent / "data" / "paraphrases.jsonl"
TYPES = ("number", "negation", "reversed", "entity", "direction")
TENANT, SCOPE = "bench", "model=gpt|conversation=none"


@dataclass
class Query:
    text: str
    base: int  # index of the base question it belongs to
    kind: str  # "paraphrase" or a negative's type
    half: str  # "tune" or "test"


def load() -> tuple[list[str], list[Query]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    order = [i for i, row in enumerate(rows) if row.get("set") != "fresh"]
    random.Random(7).shuffle(order)
    tune = set(order[:len(order) // 2])
    queries = []
    for i, row in enumerate(rows):
        half = "fresh" if row.get("set") == "fresh" else "tune" if i in tune else "test"
        queries += [Query(p, i, "paraphrase", half) for p in row["paraphrases"]]
        queries += [Query(n["text"], i, n["type"], half) for n in row["negatives"]]
    return [row["question"] for row in rows], queries


@dataclass
class Outcome:
    served: int | None  # the base whose answer is served, or None
    similarity: float


def simulate(candidates: list[list[tuple[float, int, bool]]], threshold: float,
             guard: bool) -> list[Outcome]:
    """What the cache serves at ``threshold``: with the guard, the first of the top
    candidates above it that the guard lets through; without, the nearest above it."""
    out = []
    for ranked in candidates:
        above = [c for c in ranked if c[0] >= threshold][:DEFAULT_CANDIDATES if guard else 1]
        chosen = next((c for c in above if c[2] or not guard), None)
        out.append(Outcome(chosen[1], chosen[0]) if chosen else Outcome(None, 0.0))
    return out


def score(queries: list[Query], outcomes: list[Outcome], half: str) -> dict[str, Any]:
    paraphrases = right = hits = 0
    wrong_by_type = dict.fromkeys(TYPES, 0)
    count_by_type = dict.fromkeys(TYPES, 0)
    wrong_paraphrase = 0
    for q, o in zip(queries, outcomes, strict=True):
        if q.half != half:
            continue
        if q.kind == "paraphrase":
            paraphrases += 1
            if o.served is not None:
                hits += 1
                if o.served == q.base:
                    right += 1
                else:
                    wrong_paraphrase += 1
        else:
            count_by_type[q.kind] += 1
            if o.served is not None:
                hits += 1
                wrong_by_type[q.kind] += 1
    return {
        "paraphrases": paraphrases,
        "hit_rate": round(right / paraphrases, 4),
        "hits": hits,
        "wrong_hits": hits - right,
        "precision": round(right / hits, 4) if hits else 1.0,
        "wrong_paraphrase_hits": wrong_paraphrase,
        "wrong_hits_by_type": {t: f"{wrong_by_type[t]}/{count_by_type[t]}" for t in TYPES},
    }


def choose(queries: list[Query], candidates: list[list[tuple[float, int, bool]]], guard: bool,
           target: float) -> float | None:
    """The lowest threshold whose tune precision, and that of every threshold above it,
    reaches ``target``; None if even 0.99 does not."""
    chosen = None
    for t in np.arange(0.99, 0.299, -0.01):
        t = round(float(t), 2)
        if score(queries, simulate(candidates, t, guard), "tune")["precision"] < target:
            break
        chosen = t
    return chosen


def rank(cache_vectors: np.ndarray, query_vectors: np.ndarray, bases: list[str],
         queries: list[Query], depth: int = 20) -> list[list[tuple[float, int, bool]]]:
    """Each query's nearest bases, most similar first, with the guard's verdict on each."""
    sims = query_vectors @ cache_vectors.T
    ranked = []
    for q, row in zip(queries, sims, strict=True):
        top = np.argsort(-row)[:depth]
        ranked.append([(float(row[j]), int(j), differs(q.text, bases[j]) is None) for j in top])
    return ranked


def quality(name: str, model: Embedder, bases: list[str], queries: list[Query],
            target: float) -> dict[str, Any]:
    started = time.perf_counter()
    base_vectors = model.embed(bases)
    query_vectors = model.embed([q.text for q in queries])
    embed_seconds = time.perf_counter() - started
    candidates = rank(base_vectors, query_vectors, bases, queries)
    threshold = choose(queries, candidates, True, target) or 1.0
    cosine_threshold = choose(queries, candidates, False, target)
    # the real cache at the chosen threshold, for the test half
    cache = SemanticCache(model, threshold=threshold, ttl=3600)
    for i, base in enumerate(bases):
        cache.store(TENANT, SCOPE, base, {"base": i})
    served = []
    for q in queries:
        if q.half == "tune":
            served.append(Outcome(None, 0.0))
            continue
        hit = cache.lookup(TENANT, SCOPE, q.text)
        served.append(Outcome(hit.answer["base"], hit.similarity) if hit else Outcome(None, 0))
    simulated = simulate(candidates, threshold, True)
    mismatches = sum(1 for q, a, b in zip(queries, served, simulated, strict=True)
                     if q.half != "tune" and a.served != b.served)
    sweep = {}
    for t in (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        g = score(queries, simulate(candidates, t, True), "test")
        c = score(queries, simulate(candidates, t, False), "test")
        sweep[str(t)] = {"guarded": [g["hit_rate"], g["precision"]],
                         "cosine_only": [c["hit_rate"], c["precision"]]}
    return {
        "embedder": name,
        "threshold": threshold,
        "default_threshold": DEFAULT_THRESHOLDS.get(name),
        "tune": score(queries, simulate(candidates, threshold, True), "tune"),
        "test": score(queries, served, "test"),
        "fresh": score(queries, served, "fresh"),
        "test_cosine_only_same_threshold": score(
            queries, simulate(candidates, threshold, False), "test"),
        "cosine_only_threshold": cosine_threshold,
        "test_cosine_only_own_threshold": None if cosine_threshold is None else score(
            queries, simulate(candidates, cosine_threshold, False), "test"),
        "simulation_mismatches": mismatches,
        "test_sweep_hit_rate_precision": sweep,
        "embed_texts_per_second": round((len(bases) + len(queries)) / embed_seconds),
    }


# --- latency ---------------------------------------------------------------------------------

SUBJECTS = ["my account", "the invoice", "a refund", "my order", "the API key", "the pod",
            "my flight", "the hotel booking", "my payslip", "the mortgage", "a pull request",
            "the dashboard", "my subscription", "the VPN", "a shared folder", "the printer",
            "my password", "the database", "a webhook", "the budget report", "my parcel",
            "the warranty", "a meeting room", "the SSL certificate", "my laptop"]
ACTIONS = ["reset", "cancel", "update", "export", "share", "renew", "move", "archive",
           "configure", "verify", "rename", "restore", "schedule", "approve", "merge",
           "download", "unlock", "split", "track", "migrate", "copy", "delete", "audit"]
OPENERS = ["How do I", "Can I", "Why can't I", "What happens if I", "Is it possible to",
           "Who can", "When should I", "Where do I", "What's the fastest way to",
           "Do I need permission to"]
TAILS = ["", " today", " for the team", " on mobile", " before Friday", " after the update",
         " in the EU region", " for customer {n}", " within {n} days", " under plan {n}",
         " with ticket #{n}", " for project P-{n}", " using the CLI", " in bulk"]


def synthetic(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    texts = []
    while len(texts) < n:
        tail = rng.choice(TAILS).format(n=rng.randint(1, 99_999))
        text = f"{rng.choice(OPENERS)} {rng.choice(ACTIONS)} {rng.choice(SUBJECTS)}{tail}?"
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
            "max_ms": round(ms[-1], 3)}


def latency(name: str, model: Embedder, bases: list[str], queries: list[Query],
            entries: int) -> dict[str, Any]:
    cache = SemanticCache(model, threshold=DEFAULT_THRESHOLDS[name], ttl=3600,
                          max_entries=entries)
    started = time.perf_counter()
    base_vectors = model.embed(bases)
    filler = entries - len(bases)
    if name == "hashing":
        texts = synthetic(filler)
        vectors = model.embed(texts)
        how = f"{filler} synthetic questions, all embedded"
    else:
        pool = min(2000, filler)
        pool_texts = synthetic(pool)
        pool_vectors = np.concatenate([model.embed(pool_texts[i:i + 256])
                                       for i in range(0, pool, 256)])
        rng = np.random.default_rng(3)
        texts, chunks = [], []
        for copy in range((filler + pool - 1) // pool):
            if copy == 0:
                chunks.append(pool_vectors)
            else:  # a random rotation: same geometry within the copy, unrelated to the rest
                q, _ = np.linalg.qr(rng.standard_normal((model.dimensions, model.dimensions)))
                chunks.append((pool_vectors @ q.astype(np.float32)).astype(np.float32))
            texts += [f"{t} (copy {copy})" if copy else t for t in pool_texts]
        vectors = np.concatenate(chunks)[:filler]
        texts = texts[:filler]
        how = f"{pool} synthetic questions embedded, plus rotated copies up to {filler}"
    for text, vector in zip(texts, vectors, strict=True):
        cache._put(TENANT, SCOPE, text, {"synthetic": True}, vector, cache._code(vector))
    for i, (text, vector) in enumerate(zip(bases, base_vectors, strict=True)):
        cache._put(TENANT, SCOPE, text, {"base": i}, vector, cache._code(vector))
    fill_seconds = time.perf_counter() - started
    test = [q.text for q in queries if q.half == "test"]
    for text in test[:20]:  # warm up: the code paths, not the embeddings of measured texts
        cache.lookup(TENANT, "warm-up", text)
    cache._recent.clear()
    whole, search, embed_only = [], [], []
    hits = 0
    for text in test:
        t0 = time.perf_counter()
        hit = cache.lookup(TENANT, SCOPE, text)
        t1 = time.perf_counter()
        whole.append(t1 - t0)
        hits += hit is not None
        t0 = time.perf_counter()
        cache.lookup(TENANT, SCOPE, text)  # the embedding is remembered now
        search.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.embed([text])
        embed_only.append(time.perf_counter() - t0)
    stores = []
    for text in synthetic(500, seed=2):
        cache._embed(text)  # as after a missed lookup of the same text
        t0 = time.perf_counter()
        cache.store(TENANT, SCOPE, text, {"stored": True})
        stores.append(time.perf_counter() - t0)
    return {
        "embedder": name, "entries_in_partition": len(cache), "fill": how,
        "fill_seconds": round(fill_seconds, 1), "lookups": len(test), "hits": hits,
        "lookup": percentiles(whole), "search_and_guard": percentiles(search),
        "embed_one": percentiles(embed_only), "store_with_embedding_known": percentiles(stores),
    }


# --- report ----------------------------------------------------------------------------------

def table(results: list[dict[str, Any]], timings: list[dict[str, Any]]) -> str:
    lines = []
    names = [r["embedder"] for r in results]
    width = 34

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<{width}}" + "".join(f"{v:>26}" for v in values))

    row("test half", names)
    row("threshold (chosen on tune)", [f"{r['threshold']:.2f}" for r in results])
    row("hit rate on paraphrases", [f"{r['test']['hit_rate']:.1%}" for r in results])
    row("precision of hits", [f"{r['test']['precision']:.2%} ({r['test']['wrong_hits']} wrong"
                              f" of {r['test']['hits']})" for r in results])
    for t in TYPES:
        row(f"  wrong hits, {t} negatives", [r["test"]["wrong_hits_by_type"][t] for r in results])
    row("  wrong hits, paraphrases", [str(r["test"]["wrong_paraphrase_hits"]) for r in results])
    row("cosine only, same threshold:", ["" for _ in results])
    row("  hit rate", [f"{r['test_cosine_only_same_threshold']['hit_rate']:.1%}"
                       for r in results])
    row("  precision", [f"{r['test_cosine_only_same_threshold']['precision']:.2%}"
                        for r in results])
    for t in TYPES:
        row(f"  wrong hits, {t} negatives",
            [r["test_cosine_only_same_threshold"]["wrong_hits_by_type"][t] for r in results])
    row("cosine only, threshold for target:", [
        "none reaches it" if r["cosine_only_threshold"] is None else
        f"{r['cosine_only_threshold']:.2f}: {r['test_cosine_only_own_threshold']['hit_rate']:.1%}"
        f" hits, {r['test_cosine_only_own_threshold']['precision']:.2%}" for r in results])
    row("fresh set (written after the guard)", ["" for _ in results])
    row("  hit rate on paraphrases", [f"{r['fresh']['hit_rate']:.1%}" for r in results])
    row("  precision of hits", [f"{r['fresh']['precision']:.2%} ({r['fresh']['wrong_hits']} "
                                f"wrong of {r['fresh']['hits']})" for r in results])
    for t in TYPES:
        row(f"  wrong hits, {t} negatives", [r["fresh"]["wrong_hits_by_type"][t]
                                             for r in results])
    if timings:
        lines.append("")
        row(f"lookup, {timings[0]['entries_in_partition']:,} entries in one partition",
            [t["embedder"] for t in timings])
        for key, label in (("lookup", "lookup (embedding included)"),
                           ("search_and_guard", "search + guard"), ("embed_one", "embed one"),
                           ("store_with_embedding_known", "store (embedding known)")):
            row(f"  {label} p50 / p99",
                [f"{t[key]['p50_ms']:.2f} / {t[key]['p99_ms']:.2f} ms" for t in timings])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embedders", nargs="+", default=["hashing", "minilm"])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--target", type=float, default=0.995,
                        help="the precision the threshold must reach on the tune half")
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    bases, queries = load()
    results, timings, skipped = [], [], {}
    for name in args.embedders:
        try:
            model = embedder(name)
        except ImportError as exc:
            skipped[name] = str(exc)
            print(f"{name}: skipped: {exc}", file=sys.stderr)
            continue
        results.append(quality(name, model, bases, queries, args.target))
        if not args.no_latency:
            timings.append(latency(name, model, bases, queries, args.entries))
    print(table(results, timings))
    print(json.dumps({"bench": "semantic_cache", "bases": len(bases),
                      "queries": len(queries), "target_tune_precision": args.target,
                      "quality": results, "latency": timings, "skipped": skipped}))


if __name__ == "__main__":
    main()
