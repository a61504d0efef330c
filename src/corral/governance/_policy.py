"""One decision point: ``authorize(subject, action, resource, context)``, deny by default.

A policy file (YAML) has three parts:

```yaml
types:                      # relationships, Zanzibar-style: who relates to what, and rewrites
  team:
    member: [user]                          # direct tuples: team:eng#member@user:alice
  account:
    owner: [team#member, user]              # a userset: every member of the owning team
    parent: [org]
    viewer: [user, owner, parent.viewer]    # direct, or an owner, or a viewer of the parent
  org:
    viewer: [user]
roles:                      # RBAC: which actions on which resource types a role may take
  analyst: {account: [read]}
rules:                      # ABAC and relationships; a deny beats every allow
  - id: same-region
    allow: [read]
    on: account
    roles: [analyst]
    when: {resource.region: {in: principal.regions}}
  - id: viewers-read
    allow: [read]
    on: account
    relation: viewer
  - id: no-secret
    deny: [read, write]
    on: account
    when: {resource.classification: {eq: secret}}
```

The subject is who acts (an agent, with its roles); the *principal* is on whose behalf: the user
the agent acts for, or the subject itself. Relations are checked for the principal. A rule
matches when its action and resource type match, the subject has one of its ``roles`` (when it
names any), the principal has its ``relation`` to the resource (when it names one) and its
``when`` conditions hold. ``roles:`` grants (RBAC) are allow rules named ``role:NAME``.

Every decision says which rule decided it. The same rules compile, for a subject, an action
and a resource type, into a row `Filter` that `to_sql` turns into a parameterized WHERE clause.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._errors import UsageError

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_OPS = ("eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "contains", "between")
_MAX_DEPTH = 24


class PolicyError(UsageError):
    """A mistake in a policy file: where (file and line) and what."""


# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class Subject:
    """Who acts: ``type`` and ``id`` (``agent``/``support-bot``), roles, attributes, and the
    user it acts for."""

    type: str
    id: str
    roles: frozenset[str] = frozenset()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    acting_for: Subject | None = None

    @property
    def ref(self) -> str:
        return f"{self.type}:{self.id}"

    @property
    def principal(self) -> Subject:
        return self.acting_for or self


@dataclass(frozen=True, slots=True)
class Resource:
    type: str
    id: str
    attributes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None
    """The rule that decided (None: nothing allowed it: denied by default)."""
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class Condition:
    attr: str  # "resource.region", "principal.regions", "context.amount", ...
    op: str
    value: Any  # a constant, or {"attr": "principal.regions"} for another attribute


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    effect: str  # "allow" | "deny"
    actions: frozenset[str]
    on: str
    roles: frozenset[str] = frozenset()
    relation: str | None = None
    when: tuple[Condition, ...] = ()
    line: int = 0


@dataclass(frozen=True, slots=True)
class _Part:
    """One way to have a relation: direct tuples of a subject type (``user``, or a userset
    ``team#member``), another relation of the same object, or a relation of a related one."""

    kind: str  # "direct" | "computed" | "arrow"
    type: str = ""  # direct: the subject type
    relation: str = ""  # direct userset relation, computed relation, or arrow's target
    via: str = ""  # arrow: the relation leading to the related object


# ---------------------------------------------------------------------------- loading


class _Lines(yaml.SafeLoader):
    """A YAML loader that remembers each mapping's line."""


def _mapping(loader: _Lines, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)
    result = _LineDict(loader.construct_pairs(node, deep=True))
    result.line = node.start_mark.line + 1
    result.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value
                    if isinstance(k, yaml.ScalarNode)}
    return result


class _LineDict(dict[str, Any]):
    line = 0
    lines: dict[str, int]


_Lines.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
# YAML 1.1 reads on/off/yes/no as booleans ("on: account" would be True: account): only
# true and false are booleans here.
_BOOL = "tag:yaml.org,2002:bool"
_Lines.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Lines.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                             list("tTfF"))


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: Any, message: str, key: str | None = None) -> PolicyError:
        line = getattr(where, "line", 0)
        if key is not None and isinstance(where, _LineDict):
            line = where.lines.get(key, line)
        return PolicyError(f"{self.source}, line {line}: {message}")

    def mapping(self, value: Any, parent: Any, what: str, key: str | None = None
                ) -> _LineDict:
        if not isinstance(value, dict):
            raise self.fail(parent, f"{what} must be a mapping", key)
        return value  # type: ignore[return-value]

    def names(self, value: Any, parent: Any, what: str, key: str) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(
                isinstance(i, str) and i for i in items):
            raise self.fail(parent, f"{what} must be a name or a list of names", key)
        return items


def load_policy(path: str | Path) -> Policy:
    text = Path(path).read_text() if Path(path).exists() else None
    if text is None:
        raise PolicyError(f"no policy file at {path}; create it (see docs/governance.md)")
    return parse_policy(text, str(path))


def parse_policy(text: str, source: str = "policy.yaml") -> Policy:
    try:
        data = yaml.load(text, Loader=_Lines)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{source}{line}: not valid YAML: {problem}") from None
    r = _Reader(source)
    doc = r.mapping(data if data is not None else {}, None, "the policy")
    unknown = set(doc) - {"types", "roles", "rules"}
    if unknown:
        key = sorted(unknown)[0]
        raise r.fail(doc, f"unknown section {key!r}; the sections are types, roles, rules",
                     key)
    schema = _read_types(r, doc)
    rules = _read_roles(r, doc, schema) + _read_rules(r, doc, schema)
    return Policy(schema, rules)


def _read_types(r: _Reader, doc: _LineDict) -> dict[str, dict[str, list[_Part]]]:
    types = r.mapping(doc.get("types") or _LineDict(), doc, "types", "types")
    schema: dict[str, dict[str, list[_Part]]] = {t: {} for t in types}
    raw: list[tuple[str, str, str, _LineDict]] = []
    for type_name, relations in types.items():
        if not _NAME.match(str(type_name)):
            raise r.fail(types, f"type name {type_name!r} must be lowercase letters, digits, "
                         "- or _", type_name)
        relations = r.mapping(relations or _LineDict(), types, f"type {type_name!r}",
                              type_name)
        for relation, parts in relations.items():
            for part in r.names(parts, relations, f"{type_name}.{relation}", relation):
                raw.append((type_name, relation, part, relations))
    for type_name, relation, part, where in raw:
        relations_here = {rel for t, rel, _, _ in raw if t == type_name}
        if "." in part:
            via, _, target = part.partition(".")
            if via not in relations_here:
                raise r.fail(where, f"{type_name}.{relation}: {part!r} follows {via!r}, "
                             f"which is not a relation of {type_name}", relation)
            parsed = _Part("arrow", relation=target, via=via)
        elif part in relations_here and part not in schema:
            parsed = _Part("computed", relation=part)
        else:
            subject_type, _, userset = part.partition("#")
            if subject_type not in schema and subject_type != "user":
                raise r.fail(where, f"{type_name}.{relation}: {part!r} is neither a type "
                             f"nor a relation of {type_name}; the types are "
                             f"{', '.join(sorted({*schema, 'user'}))}", relation)
            parsed = _Part("direct", type=subject_type, relation=userset)
        schema[type_name].setdefault(relation, []).append(parsed)
    for type_name, relations in schema.items():  # arrows must lead somewhere real
        for relation, parts in relations.items():
            for p in parts:
                if p.kind != "arrow":
                    continue
                targets = [q.type for q in relations[p.via] if q.kind == "direct"]
                if not any(p.relation in schema.get(t, {}) for t in targets):
                    where = r.mapping(types[type_name], types, type_name, type_name)
                    raise r.fail(where, f"{type_name}.{relation}: no type {p.via!r} leads to "
                                 f"has a relation {p.relation!r}", relation)
    return schema


def _read_roles(r: _Reader, doc: _LineDict, schema: Mapping[str, Any]) -> list[Rule]:
    roles = r.mapping(doc.get("roles") or _LineDict(), doc, "roles", "roles")
    rules = []
    for role, grants in roles.items():
        grants = r.mapping(grants, roles, f"role {role!r}", role)
        for resource, actions in grants.items():
            rules.append(Rule(f"role:{role}", "allow",
                              frozenset(r.names(actions, grants, f"{role}.{resource}",
                                                resource)),
                              resource, roles=frozenset([role]),
                              line=grants.lines.get(resource, grants.line)))
    return rules


def _read_rules(r: _Reader, doc: _LineDict, schema: Mapping[str, Any]) -> list[Rule]:
    items = doc.get("rules") or []
    if not isinstance(items, list):
        raise r.fail(doc, "rules must be a list", "rules")
    rules, seen = [], set()
    allowed_keys = {"id", "allow", "deny", "on", "roles", "relation", "when"}
    for item in items:
        rule = r.mapping(item, doc, "each rule", "rules")
        unknown = set(rule) - allowed_keys
        if unknown:
            key = sorted(unknown)[0]
            raise r.fail(rule, f"unknown rule key {key!r}; a rule has "
                         f"{', '.join(sorted(allowed_keys))}", key)
        rule_id = rule.get("id")
        if not isinstance(rule_id, str) or not rule_id:
            raise r.fail(rule, "every rule needs an id (it is what decisions cite)")
        if rule_id in seen:
            raise r.fail(rule, f"two rules have the id {rule_id!r}", "id")
        seen.add(rule_id)
        if ("allow" in rule) == ("deny" in rule):
            raise r.fail(rule, f"rule {rule_id!r} needs exactly one of allow: or deny: "
                         "(the actions it decides)")
        effect = "allow" if "allow" in rule else "deny"
        actions = r.names(rule[effect], rule, f"rule {rule_id!r}: {effect}", effect)
        on = rule.get("on")
        if not isinstance(on, str) or not on:
            raise r.fail(rule, f"rule {rule_id!r} needs on: (the resource type)")
        relation = rule.get("relation")
        if relation is not None and relation not in schema.get(on, {}):
            raise r.fail(rule, f"rule {rule_id!r}: {on} has no relation {relation!r}; it has "
                         f"{', '.join(sorted(schema.get(on, {}))) or 'none'}", "relation")
        roles = r.names(rule["roles"], rule, "roles", "roles") if "roles" in rule else []
        rules.append(Rule(rule_id, effect, frozenset(actions), on, frozenset(roles), relation,
                          _read_when(r, rule, rule_id), rule.line))
    return rules


def _read_when(r: _Reader, rule: _LineDict, rule_id: str) -> tuple[Condition, ...]:
    when = rule.get("when")
    if when is None:
        return ()
    when = r.mapping(when, rule, f"rule {rule_id!r}: when", "when")
    conditions = []
    for attr, test in when.items():
        if not isinstance(attr, str) or attr.split(".")[0] not in (
                "resource", "subject", "principal", "context"):
            raise r.fail(when, f"rule {rule_id!r}: {attr!r} must start with resource., "
                         "subject., principal. or context.", attr)
        test = r.mapping(test, when, f"rule {rule_id!r}: {attr}", attr)
        for op, value in test.items():
            if op not in _OPS:
                raise r.fail(test, f"rule {rule_id!r}: unknown operator {op!r}; the "
                             f"operators are {', '.join(_OPS)}", op)
            if op == "between" and not (isinstance(value, list) and len(value) == 2):
                raise r.fail(test, f"rule {rule_id!r}: between takes [low, high]", op)
            if isinstance(value, str) and value.split(".")[0] in (
                    "resource", "subject", "principal", "context") and "." in value:
                value = {"attr": value}
            conditions.append(Condition(attr, op, value))
    return tuple(conditions)


# ---------------------------------------------------------------------------- relationships


class Relationships:
    """Relationship tuples ``object#relation@subject``, indexed both ways. A subject is
    ``type:id`` or a userset ``type:id#relation``."""

    def __init__(self) -> None:
        self._forward: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._usersets: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._reverse: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self.count = 0

    def add(self, obj: str, relation: str, subject: str) -> None:
        subjects = self._forward[(obj, relation)]
        if subject not in subjects:
            subjects.add(subject)
            if "#" in subject:
                self._usersets[(obj, relation)].add(subject)
            self._reverse[(subject, relation, obj.partition(":")[0])].add(obj)
            self.count += 1

    def add_many(self, tuples: Iterable[tuple[str, str, str]]) -> None:
        for t in tuples:
            self.add(*t)

    def remove(self, obj: str, relation: str, subject: str) -> None:
        subjects = self._forward.get((obj, relation))
        if subjects and subject in subjects:
            subjects.discard(subject)
            self._usersets.get((obj, relation), set()).discard(subject)
            self._reverse[(subject, relation, obj.partition(":")[0])].discard(obj)
            self.count -= 1

    def subjects(self, obj: str, relation: str) -> set[str]:
        return self._forward.get((obj, relation)) or set()

    def usersets(self, obj: str, relation: str) -> set[str]:
        return self._usersets.get((obj, relation)) or set()

    def objects(self, subject: str, relation: str, type: str) -> set[str]:
        return self._reverse.get((subject, relation, type)) or set()


# ---------------------------------------------------------------------------- the engine


class Policy:
    def __init__(self, schema: dict[str, dict[str, list[_Part]]], rules: list[Rule],
                 relationships: Relationships | None = None) -> None:
        self.schema = schema
        self.rules = rules
        self.relationships = relationships or Relationships()
        self._by_target: dict[tuple[str, str], tuple[list[Rule], list[Rule]]] = {}
        for rule in rules:
            for action in rule.actions:
                deny, allow = self._by_target.setdefault((rule.on, action), ([], []))
                (deny if rule.effect == "deny" else allow).append(rule)

    # -- checks

    def check(self, obj: str, relation: str, subject: str, depth: int = 0,
              path: set[tuple[str, str]] | None = None) -> bool:
        """Whether ``subject`` (``type:id``) has ``relation`` to ``obj`` (``type:id``)."""
        path = set() if path is None else path
        if depth > _MAX_DEPTH or (obj, relation) in path:
            return False  # (a cycle adds nothing this path has not tried)
        path.add((obj, relation))
        try:
            return self._check(obj, relation, subject, depth, path)
        finally:
            path.discard((obj, relation))

    def _check(self, obj: str, relation: str, subject: str, depth: int,
               path: set[tuple[str, str]]) -> bool:
        parts = self.schema.get(obj.partition(":")[0], {}).get(relation)
        if parts is None:
            return False
        rel = self.relationships
        for p in parts:
            if p.kind == "direct":
                if not p.relation:
                    if subject in rel.subjects(obj, relation):
                        return True
                    continue
                suffix = "#" + p.relation
                for s in rel.usersets(obj, relation):
                    if s.endswith(suffix) and s.startswith(p.type + ":") and self.check(
                            s[:-len(suffix)], p.relation, subject, depth + 1, path):
                        return True
            elif p.kind == "computed":
                if self.check(obj, p.relation, subject, depth + 1, path):
                    return True
            else:
                for parent in rel.subjects(obj, p.via):
                    if self.check(parent, p.relation, subject, depth + 1, path):
                        return True
        return False

    def lookup(self, type: str, relation: str, subject: str) -> set[str]:
        """Every ``type:id`` to which ``subject`` has ``relation`` (the reverse of `check`):
        a fixpoint over the relations' definitions, each (type, relation) computed once."""
        memo: dict[tuple[str, str], set[str]] = {}
        while True:  # until nothing grows (recursive relations: groups in groups)
            before = sum(len(v) for v in memo.values())
            found = self._lookup(type, relation, subject, memo, set(), set())
            if sum(len(v) for v in memo.values()) == before:
                return found

    def _lookup(self, type: str, relation: str, subject: str,
                memo: dict[tuple[str, str], set[str]], active: set[tuple[str, str]],
                done: set[tuple[str, str]]) -> set[str]:
        key = (type, relation)
        if key in active or key in done:
            return memo.get(key, set())  # (in progress: what is known so far)
        active.add(key)
        found: set[str] = set(memo.get(key, ()))
        rel = self.relationships
        for p in self.schema.get(type, {}).get(relation, []):
            if p.kind == "direct":
                if not p.relation:
                    if subject.startswith(p.type + ":"):
                        found |= rel.objects(subject, relation, type)
                    continue
                for group in self._lookup(p.type, p.relation, subject, memo, active, done):
                    found |= rel.objects(f"{group}#{p.relation}", relation, type)
            elif p.kind == "computed":
                found |= self._lookup(type, p.relation, subject, memo, active, done)
            else:
                for parent_type in {q.type for q in self.schema[type][p.via]
                                    if q.kind == "direct"}:
                    parents = self._lookup(parent_type, p.relation, subject, memo, active, done)
                    for parent in parents:
                        found |= rel.objects(parent, p.via, type)
        active.discard(key)
        done.add(key)
        memo[key] = found
        return found

    def authorize(self, subject: Subject, action: str, resource: Resource,
                  context: Mapping[str, Any] | None = None) -> Decision:
        """Allowed or not, and by which rule. A matching deny wins; nothing matching denies."""
        deny, allow = self._by_target.get((resource.type, action), ((), ()))
        env = _Env(subject, resource, context or {})
        for rule in deny:
            if self._matches(rule, env):
                return Decision(False, rule.id, f"denied by rule {rule.id!r}")
        for rule in allow:
            if self._matches(rule, env):
                return Decision(True, rule.id, f"allowed by rule {rule.id!r}")
        return Decision(False, None, f"no rule allows {subject.ref} to {action} "
                        f"{resource.type}:{resource.id} (deny by default)")

    def _matches(self, rule: Rule, env: _Env) -> bool:
        if rule.roles and not (rule.roles & env.subject.roles):
            return False
        resource = env.resource
        assert resource is not None
        if rule.relation is not None and not self.check(
                f"{resource.type}:{resource.id}", rule.relation, env.subject.principal.ref):
            return False
        return all(_holds(c, env) for c in rule.when)

    # -- row filters

    def row_filter(self, subject: Subject, action: str, resource_type: str,
                   context: Mapping[str, Any] | None = None) -> Filter:
        """The rows of ``resource_type`` that ``subject`` may ``action``: (any allow rule) and
        not (any deny rule), with what is known about the subject and context evaluated now
        and what depends on the row left as conditions on its columns."""
        deny, allow = self._by_target.get((resource_type, action), ((), ()))
        env = _Env(subject, None, context or {})
        allowed = _any([self._rule_filter(r, env, resource_type) for r in allow])
        denied = _any([self._rule_filter(r, env, resource_type) for r in deny])
        return _all([allowed, _not(denied)])

    def _rule_filter(self, rule: Rule, env: _Env, resource_type: str) -> Filter:
        if rule.roles and not (rule.roles & env.subject.roles):
            return FALSE
        parts: list[Filter] = []
        if rule.relation is not None:
            ids = self.lookup(resource_type, rule.relation, env.subject.principal.ref)
            prefix = resource_type + ":"
            parts.append(Filter("in", "id", sorted(i[len(prefix):] for i in ids)))
        for c in rule.when:
            parts.append(_condition_filter(c, env))
        return _all(parts)


@dataclass(frozen=True, slots=True)
class _Env:
    subject: Subject
    resource: Resource | None
    context: Mapping[str, Any]

    def get(self, path: str) -> Any:
        root, _, rest = path.partition(".")
        if root == "resource":
            if self.resource is None:
                raise LookupError(path)
            if rest == "id":
                return self.resource.id
            base: Mapping[str, Any] = self.resource.attributes
        elif root == "subject":
            base = {"id": self.subject.id, "type": self.subject.type,
                    **self.subject.attributes}
        elif root == "principal":
            p = self.subject.principal
            base = {"id": p.id, "type": p.type, **p.attributes}
        else:
            base = self.context
        value: Any = base
        for key in rest.split("."):
            if not isinstance(value, Mapping) or key not in value:
                return None
            value = value[key]
        return value


def _value(c: Condition, env: _Env) -> Any:
    if isinstance(c.value, dict) and "attr" in c.value:
        return env.get(c.value["attr"])
    return c.value


def _compare(op: str, left: Any, right: Any) -> bool:
    if op in ("in", "not_in") and isinstance(right, str):
        right = [right]  # (one value, not a string to search in)
    try:
        if op == "eq":
            return bool(left == right)
        if op == "ne":
            return bool(left != right)
        if op == "in":
            return right is not None and left in right
        if op == "not_in":
            return right is None or left not in right
        if op == "contains":
            return left is not None and right in left
        if left is None or right is None:
            return False
        if op == "between":
            return bool(right[0] <= left <= right[1])
        return bool({"gt": left > right, "gte": left >= right, "lt": left < right,
                     "lte": left <= right}[op])
    except TypeError:
        return False  # (a number compared with text: the condition does not hold)


def _holds(c: Condition, env: _Env) -> bool:
    return _compare(c.op, env.get(c.attr), _value(c, env))


# ---------------------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class Filter:
    """A condition on rows: ``true``/``false``, ``and``/``or``/``not`` of ``args``, or a
    comparison ``op`` of ``column`` with ``value``."""

    op: str
    column: str | None = None
    value: Any = None
    args: tuple[Filter, ...] = ()

    def to_sql(self, columns: Mapping[str, str] | None = None, *,
               dialect: str = "sqlite") -> tuple[str, list[Any]]:
        """A parameterized WHERE clause and its parameters. ``columns`` maps attribute names
        to column names (default: the same); only mapped or plain identifiers are used."""
        params: list[Any] = []
        return _sql(self, columns or {}, dialect, params), params


TRUE = Filter("true")
FALSE = Filter("false")


def _all(parts: list[Filter]) -> Filter:
    parts = [p for p in parts if p is not TRUE and p.op != "true"]
    if any(p.op == "false" for p in parts):
        return FALSE
    return parts[0] if len(parts) == 1 else Filter("and", args=tuple(parts)) if parts else TRUE


def _any(parts: list[Filter]) -> Filter:
    parts = [p for p in parts if p.op != "false"]
    if any(p.op == "true" for p in parts):
        return TRUE
    return parts[0] if len(parts) == 1 else Filter("or", args=tuple(parts)) if parts else FALSE


def _not(f: Filter) -> Filter:
    return FALSE if f.op == "true" else TRUE if f.op == "false" else Filter("not", args=(f,))


def _condition_filter(c: Condition, env: _Env) -> Filter:
    left_on_row = c.attr.startswith("resource.")
    right = c.value
    right_on_row = isinstance(right, dict) and str(right.get("attr", "")).startswith(
        "resource.")
    if right_on_row:
        raise UsageError(f"a row filter cannot compare two columns ({c.attr} {c.op} "
                         f"{right['attr']}); move one side to the subject or context")
    value = _value(c, env)
    if not left_on_row:
        return TRUE if _compare(c.op, env.get(c.attr), value) else FALSE
    column = c.attr.removeprefix("resource.")
    if value is None and c.op in ("in", "gt", "gte", "lt", "lte", "between"):
        return FALSE  # (compared with nothing known: no row qualifies)
    if value is None and c.op == "not_in":
        return TRUE  # (not in nothing: every row, as authorize says)
    if c.op in ("in", "not_in"):
        value = sorted(value, key=str) if isinstance(value, (list, set, tuple, frozenset)) \
            else [value]
    return Filter(c.op, column, value)


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SQL_OPS = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _sql(f: Filter, columns: Mapping[str, str], dialect: str, params: list[Any]) -> str:
    mark = "%s" if dialect == "postgresql" else "?"
    if f.op == "true":
        return "1 = 1"
    if f.op == "false":
        return "1 = 0"
    if f.op in ("and", "or"):
        return "(" + f" {f.op.upper()} ".join(_sql(a, columns, dialect, params)
                                              for a in f.args) + ")"
    if f.op == "not":
        return f"NOT {_sql(f.args[0], columns, dialect, params)}"
    assert f.column is not None
    column = columns.get(f.column, f.column)
    if not all(_IDENT.match(part) for part in column.split(".")):
        raise UsageError(f"{column!r} is not a plain column name; map the attribute to a "
                         "column in to_sql(columns=...)")
    # A NULL column never satisfies a comparison, as in authorize; spelled out so that a
    # comparison under NOT (a deny rule) is false, not NULL, and the row is not lost.
    if f.op in ("in", "not_in"):
        if not f.value:
            return "1 = 0" if f.op == "in" else "1 = 1"
        params.append(list(f.value) if dialect == "postgresql" else _json_list(f.value))
        if dialect == "postgresql":
            test = f"{column} = ANY({mark})"
        else:
            test = f"{column} IN (SELECT value FROM json_each({mark}))"
        return f"({column} IS NOT NULL AND {test})" if f.op == "in" \
            else f"({column} IS NULL OR NOT {test})"
    if f.op == "between":
        params.extend(f.value)
        return f"({column} IS NOT NULL AND {column} BETWEEN {mark} AND {mark})"
    if f.op == "contains":
        raise UsageError(f"a row filter cannot test whether column {column!r} contains a "
                         "value; use in/eq on a scalar column")
    if f.value is None:
        return f"{column} IS NULL" if f.op == "eq" else f"{column} IS NOT NULL"
    params.append(f.value)
    if f.op == "ne":
        return f"({column} IS NULL OR {column} <> {mark})"
    return f"({column} IS NOT NULL AND {column} {_SQL_OPS[f.op]} {mark})"


def _json_list(values: Iterable[Any]) -> str:
    import json

    return json.dumps(list(values))
