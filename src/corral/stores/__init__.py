"""Where corral keeps runs, journals and signals: SQLite embedded, PostgreSQL in a cluster."""

from ._base import (
    Batch,
    Claimed,
    JournalEntry,
    RunRecord,
    RunSpec,
    Signal,
    Store,
    check_resubmission,
)
from .sqlite import SQLiteStore

__all__ = [
    "Batch",
    "Claimed",
    "JournalEntry",
    "RunRecord",
    "RunSpec",
    "SQLiteStore",
    "Signal",
    "Store",
    "check_resubmission",
]
