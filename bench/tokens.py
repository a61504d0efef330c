"""Capability token verification: verifications per second of a token as issued (depth 0) and
after 1 and 3 attenuations, each checked against a revocation set of 10,000 ids (what a gateway
or the tool pipeline does per call, offline, with the issuer's public key).

    python bench/tokens.py [--verifies 5000] [--repeat 5]

Prints one JSON line: per depth, the median of --repeat runs of --verifies verifications, in
verifications per second and µs each, and the token's length in characters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.governance._tokens import Scope, TokenIssuer, attenuate, verify


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--verifies", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    issuer = TokenIssuer(Ed25519PrivateKey.generate())
    public = issuer.public_key
    revoked = {os.urandom(16).hex() for _ in range(10_000)}
    tokens = {0: issuer.issue("manager@1", "acme", [
        Scope("crm", "accounts/acme/**", ("read", "write")), Scope("mail", "outbox/*", ("send",)),
    ], ttl=3600)}
    narrower = [Scope("crm", "accounts/acme/**", ("read", "write")),
                Scope("crm", "accounts/acme/*", ("read", "write")),
                Scope("crm", "accounts/acme/*", ("read",))]
    token = tokens[0]
    for depth, scope in enumerate(narrower, start=1):
        token = attenuate(token, scopes=[scope], ttl=1800, subject=f"specialist-{depth}@1")
        tokens[depth] = token
    results = {}
    for depth in (0, 1, 3):
        runs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            for _ in range(args.verifies):
                verify(tokens[depth], public, "crm", "accounts/acme/7", "read", revoked=revoked)
            runs.append((time.perf_counter() - started) / args.verifies)
        each = statistics.median(runs)
        results[f"depth_{depth}"] = {"verify_per_s": round(1 / each), "us_per_verify":
                                     round(each * 1e6, 1), "token_chars": len(tokens[depth])}
    print(json.dumps({"bench": "tokens", "verifies": args.verifies, "repeat": args.repeat,
                      **results}))


if __name__ == "__main__":
    main()
