"""Governance: agent identities, policy with row filters, capability tokens, PII redaction and
tamper-evident decision records."""

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

__all__ = ["Decision", "Filter", "Policy", "PolicyError", "Relationships", "Resource",
           "Subject", "load_policy", "parse_policy"]
