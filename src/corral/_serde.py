"""JSON in and out of the journal, typed by the annotations of steps and workflows."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError, to_json

__all__ = ["PydanticSerializationError", "adapter", "dumps", "loads"]


def dumps(value: Any) -> bytes:
    """Serialize pydantic models, dataclasses, datetimes and plain data to compact JSON."""
    return to_json(value)


@lru_cache(maxsize=1024)
def adapter(tp: Any) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def loads(data: str | bytes | None, tp: Any = Any) -> Any:
    """Parse JSON, validated into ``tp`` when it is more than ``Any``."""
    if data is None:
        return None
    if tp is Any:
        return json.loads(data)
    return adapter(tp).validate_json(data)
