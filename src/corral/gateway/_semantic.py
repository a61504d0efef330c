"""The semantic cache: serve a stored answer to a question that means the same.

Entries live in partitions, one per (tenant, scope): a lookup searches its own partition only,
so a tenant never sees another's answers, nor a conversation another's (the gateway's scope is
the model plus a hash of the rest of the request). A lookup embeds the question, takes the
stored questions at or above the similarity threshold, best first, and serves the first of the
top ``candidates`` that `differs` lets through: similar texts that ask about other numbers,
other names, the opposite, or the other way round do not share an answer.

The threshold is a floor: a request may ask for a higher one, and a lower one is ignored
(the floor is what keeps wrong answers out, so a caller cannot trade it away). Entries expire
``ttl`` seconds after they were stored; past ``max_entries`` (all tenants together) the least
recently used goes first.

Cost (bench/semantic_cache.py, 2 busy cores): a lookup is one embedding of the question
(hashing: 0.06 ms; MiniLM: 7 ms on one thread; none when the exact text is stored), a search of
its partition (0.5 ms at 100,000 entries: sign bits first, then the vectors that may pass) and
the guard on up to ``candidates`` texts (about 0.1 ms to read a text, less to compare). A
store right after a missed lookup of the same text reuses that lookup's embedding: 0.04 ms.
MiniLM's lookups are worth a thread (``asyncio.to_thread``); hashing's are not.
Memory: a vector (1.5 KB for MiniLM, 2 KB for hashing) and 64 bytes of sign bits per entry,
besides the answer itself.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._embeddings import Embedder, Vectors, embedder
from ._guard import Facts, differs_facts, facts

if TYPE_CHECKING:
    from ._config import Cache

DEFAULT_THRESHOLDS = {"hashing": 0.70, "minilm": 0.80}
"""The similarity floor for each embedder, chosen on bench/data/paraphrases.jsonl's tune half
(bench/semantic_cache.py): the lowest at which served answers stay at least 99.5% right."""
DEFAULT_CANDIDATES = 5

_BITS = 512  # sign bits per vector for the Hamming prefilter
_PREFILTER_FROM = 4096  # partitions smaller than this are searched exactly, row by row
_SIGMAS = 4.5  # how far past its mean distance a match at the threshold may fall


@dataclass(slots=True, frozen=True)
class Hit:
    """A stored answer served for a question."""

    answer: dict[str, Any]
    similarity: float
    """Cosine similarity between the question asked and the stored one (1.0: the same text)."""
    text: str
    """The stored question whose answer this is."""


@dataclass(slots=True, eq=False)
class _Entry:
    key: tuple[str, str]
    row: int
    text: str
    answer: dict[str, Any]
    expires: float
    facts: Facts | None = None


class _Partition:
    """One (tenant, scope)'s vectors: a float32 matrix and its sign-bit codes, rows packed."""

    __slots__ = ("by_text", "codes", "entries", "size", "vectors")

    def __init__(self, dimensions: int) -> None:
        self.vectors: Vectors = np.empty((8, dimensions), dtype=np.float32)
        self.codes: npt.NDArray[np.uint64] = np.empty((_BITS // 64, 8), dtype=np.uint64)
        self.entries: list[_Entry] = []
        self.by_text: dict[str, _Entry] = {}
        self.size = 0

    def add(self, entry: _Entry, vector: Vectors, code: npt.NDArray[np.uint64]) -> None:
        if self.size == len(self.vectors):
            grown = 2 * self.size
            self.vectors = np.resize(self.vectors, (grown, self.vectors.shape[1]))
            codes = np.empty((self.codes.shape[0], grown), dtype=np.uint64)
            codes[:, :self.size] = self.codes
            self.codes = codes
        entry.row = self.size
        self.vectors[self.size] = vector
        self.codes[:, self.size] = code
        self.entries.append(entry)
        self.by_text[entry.text] = entry
        self.size += 1

    def remove(self, entry: _Entry) -> None:
        last = self.size - 1
        row = entry.row
        if row != last:  # move the last row into the hole
            moved = self.entries[last]
            self.vectors[row] = self.vectors[last]
            self.codes[:, row] = self.codes[:, last]
            self.entries[row] = moved
            moved.row = row
        self.entries.pop()
        del self.by_text[entry.text]
        self.size = last

    def search(self, vector: Vectors, code: npt.NDArray[np.uint64], floor: float,
               k: int) -> list[tuple[_Entry, float]]:
        """Up to ``k`` entries at or above ``floor``, most similar first."""
        n = self.size
        rows = None
        if n >= _PREFILTER_FROM:
            rows = np.flatnonzero(_hamming(self.codes, code, n) <= _cutoff(floor))
            if rows.size > n // 8:
                rows = None  # gathering that many rows costs more than scanning them all
        sims = self.vectors[:n] @ vector if rows is None else self.vectors[rows] @ vector
        above = np.flatnonzero(sims >= floor)
        if above.size > k:
            above = above[np.argpartition(-sims[above], k - 1)[:k]]
        above = above[np.argsort(-sims[above], kind="stable")]
        found = rows[above] if rows is not None else above
        return [(self.entries[r], float(s)) for r, s in zip(found, sims[above], strict=True)]


def _hamming(codes: npt.NDArray[np.uint64], code: npt.NDArray[np.uint64],
             n: int) -> npt.NDArray[np.uint16]:
    total = np.zeros(n, dtype=np.uint16)
    word = np.empty(n, dtype=np.uint64)
    bits = np.empty(n, dtype=np.uint8)
    for i in range(codes.shape[0]):
        np.bitwise_xor(codes[i, :n], code[i], out=word)
        np.bitwise_count(word, out=bits)
        total += bits
    return total


_CUTOFFS: dict[float, int] = {}


def _cutoff(floor: float) -> int:
    """The most sign bits in which a vector at ``floor`` similarity may differ, in practice.

    Against a random hyperplane two vectors at angle θ fall on different sides with
    probability θ/π, so the count of differing bits is binomial; the cutoff sits ``_SIGMAS``
    standard deviations past its mean, where a match at the floor is left out about 3 times
    in a million (one further above the floor, far less often).
    """
    cutoff = _CUTOFFS.get(floor)
    if cutoff is None:
        p = math.acos(max(-1.0, min(1.0, floor))) / math.pi
        mean = _BITS * p
        cutoff = max(8, math.ceil(mean + _SIGMAS * math.sqrt(_BITS * p * (1 - p))))
        _CUTOFFS[floor] = cutoff
    return cutoff


class SemanticCache:
    """Answers by meaning, partitioned by tenant and scope. Thread-safe; methods block.

    ``threshold`` is the least cosine similarity at which an answer may be served; a lookup
    may raise it (``lookup(..., threshold=0.95)``), and a lower value is ignored. ``clock``
    (seconds, never going back) is there for tests.
    """

    def __init__(self, embedder: Embedder, *, threshold: float, ttl: float,
                 max_entries: int = 100_000, candidates: int = DEFAULT_CANDIDATES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], not {threshold}")
        if ttl <= 0 or max_entries < 1 or candidates < 1:
            raise ValueError("ttl, max_entries and candidates must be positive")
        self.embedder = embedder
        self.threshold = threshold
        self.ttl = ttl
        self.max_entries = max_entries
        self.candidates = candidates
        self._clock = clock
        self._lock = threading.Lock()
        self._partitions: dict[tuple[str, str], _Partition] = {}
        self._by_age: OrderedDict[_Entry, None] = OrderedDict()  # oldest first: expiry order
        self._by_use: OrderedDict[_Entry, None] = OrderedDict()  # least recently used first
        self._recent: OrderedDict[str, tuple[Vectors, npt.NDArray[np.uint64]]] = OrderedDict()
        rng = np.random.default_rng(0x5E3A)
        self._planes = rng.standard_normal((embedder.dimensions, _BITS)).astype(np.float32)

    def __len__(self) -> int:
        return len(self._by_age)

    def lookup(self, tenant: str, scope: str, text: str, *,
               threshold: float | None = None) -> Hit | None:
        """The answer stored for a question of this tenant and scope that means ``text``."""
        floor = self.threshold if threshold is None else max(self.threshold, threshold)
        key = (tenant, scope)
        with self._lock:
            self._expire()
            partition = self._partitions.get(key)
            if partition is None:
                return None
            same = partition.by_text.get(text)
            if same is not None:
                self._by_use.move_to_end(same)
                return Hit(answer=same.answer, similarity=1.0, text=same.text)
        vector, code = self._embed(text)
        with self._lock:
            partition = self._partitions.get(key)
            if partition is None:
                return None
            found = partition.search(vector, code, floor, self.candidates)
        if not found:
            return None
        asked = facts(text)
        for entry, similarity in found:
            if entry.facts is None:
                entry.facts = facts(entry.text)
            if differs_facts(asked, entry.facts) is None:
                with self._lock:
                    if entry in self._by_use:
                        self._by_use.move_to_end(entry)
                return Hit(answer=entry.answer, similarity=min(similarity, 1.0), text=entry.text)
        return None

    def store(self, tenant: str, scope: str, text: str, answer: dict[str, Any]) -> None:
        """Keep ``answer`` for ``text`` in this tenant and scope, replacing the same text's."""
        vector, code = self._embed(text)
        self._put(tenant, scope, text, answer, vector, code)

    def _put(self, tenant: str, scope: str, text: str, answer: dict[str, Any],
             vector: Vectors, code: npt.NDArray[np.uint64]) -> None:
        key = (tenant, scope)
        with self._lock:
            self._expire()
            partition = self._partitions.get(key)
            if partition is None:
                partition = self._partitions[key] = _Partition(self.embedder.dimensions)
            old = partition.by_text.get(text)
            if old is not None:
                self._remove(old)
                partition = self._partitions.setdefault(key, partition)
            entry = _Entry(key=key, row=-1, text=text, answer=answer,
                           expires=self._clock() + self.ttl)
            partition.add(entry, vector, code)
            self._by_age[entry] = None
            self._by_use[entry] = None
            while len(self._by_use) > self.max_entries:
                self._remove(next(iter(self._by_use)))

    def _embed(self, text: str) -> tuple[Vectors, npt.NDArray[np.uint64]]:
        with self._lock:
            known = self._recent.get(text)
        if known is not None:
            return known
        vector = self.embedder.embed([text])[0]
        code = self._code(vector)
        with self._lock:
            self._recent[text] = (vector, code)
            if len(self._recent) > 256:
                self._recent.popitem(last=False)
        return vector, code

    def _code(self, vector: Vectors) -> npt.NDArray[np.uint64]:
        """The vector's side of each of ``_BITS`` random hyperplanes, packed in 64-bit words."""
        code: npt.NDArray[np.uint64] = np.packbits(vector @ self._planes > 0).view(np.uint64)
        return code

    def _expire(self) -> None:
        now = self._clock()
        while self._by_age:
            oldest = next(iter(self._by_age))
            if oldest.expires > now:
                break
            self._remove(oldest)

    def _remove(self, entry: _Entry) -> None:
        partition = self._partitions[entry.key]
        partition.remove(entry)
        if not partition.size:
            del self._partitions[entry.key]
        del self._by_age[entry]
        del self._by_use[entry]


def semantic_cache(config: Cache) -> SemanticCache:
    """The semantic cache a gateway's ``[gateway.cache]`` section asks for."""
    chosen = embedder(config.embedder)
    threshold = config.min_similarity or DEFAULT_THRESHOLDS[chosen.name]
    return SemanticCache(chosen, threshold=threshold, ttl=config.ttl,
                         max_entries=config.max_entries)
