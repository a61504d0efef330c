"""Governance: agent identities, policy with row filters, capability tokens, PII redaction and
tamper-evident decision records."""

from ._pii import Finding, Redacted, Redactor, StreamRestorer, Vault
from ._policy import (
    Decision,
    Filter,
    Policy,
    PolicyError,
    Relationships,
    Resource,
    Subject,
    load_policy,
    parse_policy,
)
from ._records import DecisionLog, DecisionRecord, TreeHead, Verification, verify_proof

__all__ = [
    "Decision",
    "DecisionLog",
    "DecisionRecord",
    "Filter",
    "Finding",
    "Policy",
    "PolicyError",
    "Redacted",
    "Redactor",
    "Relationships",
    "Resource",
    "StreamRestorer",
    "Subject",
    "TreeHead",
    "Vault",
    "Verification",
    "load_policy",
    "parse_policy",
    "verify_proof",
]
