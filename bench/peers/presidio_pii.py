"""Presidio's pattern recognizers, the peer of bench/pii.py. Runs in its own venv
(``/work/venvs/presidio``, made by bench/pii.py on first use: ``python3 -m venv`` then
``pip install presidio-analyzer``), driven over stdin/stdout by bench/pii.py.

What runs: an ``AnalyzerEngine`` with a registry holding only Presidio's predefined
recognizers for the types corral also finds without NER: ``CreditCardRecognizer``,
``EmailRecognizer``, ``IbanRecognizer``, ``IpRecognizer``, ``UsSsnRecognizer`` (regex
patterns with validators) and ``PhoneRecognizer`` (the ``phonenumbers`` library's matcher, for
the regions Presidio enables by default; Presidio has no phone regex). Presidio has no
recognizer for API keys or tokens.

Offline, without a spaCy model: the NLP engine is Presidio's ``SpacyNlpEngine`` over
``spacy.blank("en")``, a tokenizer with no weights, so the analyzer runs as it does in
production except for named-entity recognition (which corral's pattern path does not do
either). ``score_threshold`` is 0, Presidio's default: every pattern hit is returned, so the
missing lemmas (which only raise scores through context words) change no result. tldextract,
which the e-mail recognizer uses, reads its bundled suffix list instead of fetching one.

Protocol: one JSON line out when ready (``{"ready": true, "version": ...}``); then per line
in: ``{"cmd": "detect", "texts": [...]}`` -> ``{"spans": [[[start, end, entity, score], ...],
...]}`` with corral's entity names; ``{"cmd": "time", "texts": [...], "rounds": n}`` ->
``{"seconds": wall, "cpu_seconds": cpu, "texts": n}`` for analyzing every text ``rounds``
times; ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from importlib.metadata import version
from typing import Any

try:
    import spacy
    import tldextract
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit(f"{exc.name} is missing: run this with the presidio venv's python "
                     "(bench/pii.py makes it: /work/venvs/presidio)") from exc

TO_CORRAL = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CREDIT_CARD",
             "IBAN_CODE": "IBAN", "US_SSN": "US_SSN", "IP_ADDRESS": "IP_ADDRESS"}


def build() -> AnalyzerEngine:
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())
    nlp = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank:en"}])
    nlp.nlp = {"en": spacy.blank("en")}
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (CreditCardRecognizer(), EmailRecognizer(), IbanRecognizer(),
                       IpRecognizer(), UsSsnRecognizer(), PhoneRecognizer()):
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"])


def main() -> None:
    engine = build()
    entities = list(TO_CORRAL)
    engine.analyze("warm up: a@b.co +1 415 555 2671", language="en", entities=entities)
    print(json.dumps({"ready": True, "version": version("presidio-analyzer"),
                      "recognizers": [r.name for r in engine.registry.recognizers]}), flush=True)
    for line in sys.stdin:
        msg: dict[str, Any] = json.loads(line)
        if msg["cmd"] == "detect":
            out = []
            for text in msg["texts"]:
                results = engine.analyze(text, language="en", entities=entities)
                out.append([[r.start, r.end, TO_CORRAL[r.entity_type], r.score]
                            for r in results if r.entity_type in TO_CORRAL])
            print(json.dumps({"spans": out}), flush=True)
        elif msg["cmd"] == "time":
            texts = msg["texts"]
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(msg["rounds"]):
                for text in texts:
                    engine.analyze(text, language="en", entities=entities)
            print(json.dumps({"seconds": time.perf_counter() - start,
                              "cpu_seconds": time.process_time() - cpu,
                              "texts": len(texts) * msg["rounds"]}), flush=True)
        else:
            return


if __name__ == "__main__":
    main()
