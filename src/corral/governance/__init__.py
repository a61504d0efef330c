"""Governance: agent identities, policy with row filters, capability tokens, PII redaction and tamper-evident decision records."""
