"""The checks a cascade runs on a cheaper model's answer before it keeps it.

An answer is rejected, and the next model asked, when it does not follow the request's
``response_format`` (not JSON, or not valid against its JSON schema), when the configured
validator says no, or when the model's own confidence (the mean probability of its tokens, from
logprobs) is under ``min_confidence``.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from typing import Any

from .._errors import UsageError
from ._config import Cascade

Validator = Callable[[dict[str, Any], str], "bool | str | None"]


def load_validator(path: str) -> Validator:
    module, _, name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UsageError(f"the cascade validator {path!r} cannot be loaded ({exc}); give it "
                         "as module:function, importable by the gateway") from None
    if not callable(found):
        raise UsageError(f"the cascade validator {path!r} is not a function")
    return found  # type: ignore[no-any-return]


def wants_logprobs(cascade: Cascade) -> bool:
    return cascade.min_confidence is not None


def rejection(cascade: Cascade, validator: Validator | None, request: dict[str, Any],
              answer: dict[str, Any]) -> str | None:
    """Why ``answer`` is not good enough (None: keep it)."""
    choice = answer["choices"][0]
    text = choice["message"].get("content") or ""
    problem = _format(request.get("response_format"), text)
    if problem:
        return problem
    if validator is not None:
        verdict = validator(request, text)
        if verdict is False or isinstance(verdict, str):
            return "validator" if verdict is False else f"validator: {verdict}"
    if cascade.min_confidence is not None:
        tokens = ((choice.get("logprobs") or {}).get("content")) or []
        if tokens:
            confidence = math.exp(sum(t["logprob"] for t in tokens) / len(tokens))
            if confidence < cascade.min_confidence:
                return "low confidence"
    return None


def _format(response_format: Any, text: str) -> str | None:
    if not isinstance(response_format, dict) or response_format.get("type") not in (
            "json_object", "json_schema"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return "not JSON"
    if response_format["type"] == "json_object":
        return None if isinstance(data, dict) else "not a JSON object"
    schema = (response_format.get("json_schema") or {}).get("schema")
    if not isinstance(schema, dict):
        return None
    import jsonschema

    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError:
        return "schema"
    except jsonschema.SchemaError:
        return None  # (the request's own schema is broken: nothing to check against)
    return None
