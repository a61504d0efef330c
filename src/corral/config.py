"""One configuration for every store and engine: a TOML file, overridden by the environment.

```toml
# corral.toml
engine = "temporal://temporal-frontend:7233?namespace=default&task_queue=corral"
database = "postgresql://corral@db:5432/corral"   # shared records: payload blobs, later more
redis = "redis://redis:6379/0"                    # shared counters and caches
```

``$CORRAL_ENGINE``, ``$CORRAL_DATABASE_URL`` and ``$CORRAL_REDIS_URL`` override the file (so
secrets can stay out of it); ``$CORRAL_CONFIG`` names the file (default ``./corral.toml`` when it
exists). With nothing configured, corral is embedded: one SQLite file, ``.corral/corral.db``.
Later sections (the gateway's, governance's) go in the same file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import UsageError

_KEYS = {"engine": "CORRAL_ENGINE", "database": "CORRAL_DATABASE_URL", "redis": "CORRAL_REDIS_URL"}
# sections read by the components that own them
_SECTIONS = {"gateway", "governance", "observability", "server"}


@dataclass(frozen=True)
class Config:
    engine: str | None = None
    """``temporal://host:port[?namespace=&task_queue=]``, or a SQLite path (embedded)."""
    database: str | None = None
    """``postgresql://...`` or a SQLite path: where shared records live."""
    redis: str | None = None
    """``redis://...``: shared counters and caches."""
    source: str = "defaults"
    sections: Mapping[str, Any] | None = None

    @property
    def temporal(self) -> bool:
        return bool(self.engine and self.engine.startswith("temporal://"))

    @property
    def embedded_db(self) -> str:
        from .runtime import DEFAULT_DB

        if self.engine and not self.temporal:
            return self.engine.removeprefix("sqlite:///")
        return os.environ.get("CORRAL_DB") or DEFAULT_DB

    @property
    def shared_db(self) -> str:
        """The database shared records go to: the configured one, else the embedded file."""
        return self.database or self.embedded_db


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the file (``path``, ``$CORRAL_CONFIG`` or ``./corral.toml``), then the environment."""
    env = os.environ if env is None else env
    path = path or env.get("CORRAL_CONFIG")
    values: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    source = "defaults"
    if path is None and os.path.exists("corral.toml"):
        path = "corral.toml"
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist; check the path given with "
                             "--config or $CORRAL_CONFIG") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {path} is not valid TOML: {exc}; fix it") from None
        for key, value in data.items():
            if key in _SECTIONS and isinstance(value, dict):
                sections[key] = value
            elif key not in _KEYS:
                known = ", ".join([*_KEYS, *(f"[{s}]" for s in sorted(_SECTIONS))])
                raise UsageError(f"config file {path}: unknown key {key!r}; the keys are {known}")
            elif not isinstance(value, str):
                raise UsageError(f"config file {path}: {key} must be a string (a URL or a "
                                 f"path), not {type(value).__name__}")
            else:
                values[key] = value
        source = path
    for key, variable in _KEYS.items():
        if env.get(variable):
            values[key] = env[variable]
    engine = values.get("engine")
    if engine and "://" in engine and not engine.startswith(("temporal://", "sqlite:///")):
        raise UsageError(f"engine {engine!r} is neither temporal://host:port nor a SQLite path")
    return Config(**values, source=source, sections=sections)


def connect(config: Config | None = None, *, worker: bool = True, **options: Any) -> Any:
    """The runtime the configuration names: `corral.Runtime` (embedded) or, for
    ``temporal://``, a `TemporalRuntime` whose large payloads go to the shared database.
    Use it as ``async with corral.connect() as rt:``; the workflow code is the same."""
    config = config or load_config()
    if config.temporal:
        from .runtime._temporal import TemporalRuntime

        assert config.engine is not None
        return TemporalRuntime.from_url(config.engine, worker=worker, blobs=config.database,
                                        **options)
    from .runtime import Runtime

    return Runtime(config.embedded_db, worker=worker, **options)
