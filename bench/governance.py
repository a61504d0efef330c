"""Policy decisions with 1,000,000 relationship tuples: checks per second and latency
percentiles of `authorize` (roles, attribute conditions and relationships with rewrites: team
membership, account ownership, a parent organization's viewers), and of a row filter's compile.
Target: p99 at most 50 µs per decision, in process.

    python bench/governance.py [--tuples 1000000] [--checks 200000] [--repeat 3]

Prints a table and one JSON line (medians of --repeat runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from typing import Any

from corral.governance._policy import Policy, Resource, Subject, parse_policy

POLICY = """
types:
  team:
    member: [user]
  org:
    viewer: [user, team#member]
  account:
    owner: [team#member, user]
    parent: [org]
    viewer: [user, owner, parent.viewer]
roles:
  auditor: {account: [read]}
rules:
  - id: analysts-in-region
    allow: [read]
    on: account
    roles: [analyst]
    when:
      resource.region: {in: principal.regions}
      resource.classification: {ne: secret}
  - id: viewers-read
    allow: [read]
    on: account
    relation: viewer
  - id: no-large-transfers
    deny: [read, transfer]
    on: account
    when:
      context.amount: {gt: 10000}
"""


def build(tuples: int, rng: random.Random) -> tuple[Policy, int, int]:
    """Users in teams, accounts owned by teams or users, accounts in orgs viewed by teams."""
    policy = parse_policy(POLICY)
    rel = policy.relationships
    users, teams, orgs = tuples // 10, tuples // 100, tuples // 1000
    accounts = tuples // 4
    for u in range(users):  # 2 teams each: 0.2 n
        for t in rng.sample(range(teams), 2):
            rel.add(f"team:t{t}", "member", f"user:u{u}")
    for a in range(accounts):  # an owner and a parent each: 0.5 n
        owner = f"team:t{rng.randrange(teams)}#member" if rng.random() < 0.8 \
            else f"user:u{rng.randrange(users)}"
        rel.add(f"account:a{a}", "owner", owner)
        rel.add(f"account:a{a}", "parent", f"org:o{rng.randrange(orgs)}")
    for o in range(orgs):  # 3 viewer teams each
        for t in rng.sample(range(teams), 3):
            rel.add(f"org:o{o}", "viewer", f"team:t{t}#member")
    while rel.count < tuples:  # the rest: direct viewers
        rel.add(f"account:a{rng.randrange(accounts)}", "viewer",
                f"user:u{rng.randrange(users)}")
    return policy, users, accounts


def run(policy: Policy, users: int, accounts: int, checks: int, rng: random.Random
        ) -> dict[str, Any]:
    regions = ["eu", "us", "apac"]
    cases = []
    for _ in range(checks):
        user = Subject("user", f"u{rng.randrange(users)}",
                       attributes={"regions": rng.sample(regions, 1)})
        subject = Subject("agent", "bot", frozenset({"analyst"} if rng.random() < 0.3
                                                    else ()), acting_for=user)
        resource = Resource("account", f"a{rng.randrange(accounts)}",
                            {"region": rng.choice(regions), "classification": "internal"})
        cases.append((subject, resource, {"amount": rng.choice([10, 50_000])}))
    authorize = policy.authorize
    clock = time.perf_counter_ns
    latencies = []
    allowed = 0
    gc.disable()
    started = time.perf_counter()
    for subject, resource, context in cases:
        t0 = clock()
        decision = authorize(subject, "read", resource, context)
        latencies.append(clock() - t0)
        allowed += decision.allowed
    elapsed = time.perf_counter() - started
    gc.enable()
    latencies.sort()
    return {"checks_per_s": checks / elapsed,
            "p50_us": latencies[len(latencies) // 2] / 1000,
            "p99_us": latencies[int(len(latencies) * 0.99)] / 1000,
            "p999_us": latencies[int(len(latencies) * 0.999)] / 1000,
            "allowed_share": allowed / checks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tuples", type=int, default=1_000_000)
    parser.add_argument("--checks", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(1)
    started = time.perf_counter()
    policy, users, accounts = build(args.tuples, rng)
    load_s = time.perf_counter() - started
    runs = [run(policy, users, accounts, args.checks, rng) for _ in range(args.repeat)]
    filter_us = []
    for u in range(200):
        subject = Subject("user", f"u{u}", attributes={"regions": ["eu"]})
        t0 = time.perf_counter_ns()
        policy.row_filter(subject, "read", "account").to_sql()
        filter_us.append((time.perf_counter_ns() - t0) / 1000)
    result = {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
    out = {"bench": "governance_policy", "tuples": policy.relationships.count,
           "checks": args.checks, "repeat": args.repeat, "load_s": round(load_s, 1),
           **result, "row_filter_compile_us_median": round(statistics.median(filter_us), 1)}
    print(f"{out['tuples']:,} tuples loaded in {out['load_s']} s")
    print(f"authorize: {out['checks_per_s']:,.0f}/s  p50 {out['p50_us']} µs  "
          f"p99 {out['p99_us']} µs  p99.9 {out['p999_us']} µs  "
          f"(allowed {out['allowed_share']:.0%})")
    print(f"row filter for a user (lookup + SQL): {out['row_filter_compile_us_median']} µs")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
