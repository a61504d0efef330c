"""A run's trace, assembled: its runs (the run and its children), their journals and the
spans stored for them, as one tree of spans; where the time and the money went."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._spans import AttributeValue, Span, run_span_id, step_span_id, trace_id_for

if TYPE_CHECKING:
    from ..stores._base import JournalEntry, RunRecord

# what each span's time counts as, by its gen_ai.operation.name (or corral's own kinds)
COMPONENTS = ("queue", "model", "tool", "retrieval", "waiting", "steps")
_COMPONENT = {"chat": "model", "text_completion": "model", "embeddings": "model",
              "execute_tool": "tool", "retrieval": "retrieval", "wait": "waiting",
              "step": "steps"}
_ENTRY_STATUS = {"ok": "ok", "error": "error"}  # a journal entry's status: its span's
_RUN_STATUS = {"completed": "ok", "failed": "error", "cancelled": "error"}  # a run's: its span's


def journal_span(run_id: str, trace_id: str, parent: str, key: str, kind: str, name: str,
                 status: str, value: str | bytes | None, started: float, ended: float | None,
                 attempts: int) -> Span:
    """The span of one journal entry: a step, a timer, a signal wait, a child run."""
    attributes: dict[str, AttributeValue] = {"corral.run.id": run_id}
    if kind == "step":
        title, operation = f"step {name}", "step"
        attributes["corral.step"] = name
        attributes["corral.attempts"] = attempts
    elif kind == "sleep":
        title, operation = "sleep", "wait"
    elif kind == "wait":
        title, operation = f"wait_for {name}", "wait"
        attributes["corral.signal"] = name
    else:  # "child"
        title, operation = f"run_child {name}", "run_child"
        outcome = _json(value)  # {"id"} while it runs, {"seq", "value": {"id", ...}} after
        child = outcome.get("id") or (outcome.get("value") or {}).get("id")
        if child:
            attributes["corral.child_run.id"] = child
    attributes["corral.operation"] = operation
    message = ""
    if status == "error":
        error = _json(value)
        message = str(error.get("message", ""))
        attributes["error.type"] = str(error.get("type", "Error"))
    if ended is None:
        attributes["corral.pending"] = True
    return Span(trace_id=trace_id, span_id=step_span_id(run_id, key), parent_id=parent,
                name=title, start=started, end=started if ended is None else ended,
                status=_ENTRY_STATUS.get(status, "unset"), message=message,
                attributes=attributes)


def run_span(run_id: str, trace_id: str, workflow: str, parent: str | None, tenant: str | None,
             created: float, started: float | None, ended: float | None, status: str,
             error: str | None) -> Span:
    """The ``invoke_workflow`` span of a run, from its submission (queue wait included) to its
    end (a run that has not ended is marked pending, and ends where it started)."""
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "invoke_workflow", "corral.run.id": run_id,
        "corral.workflow": workflow, "corral.run.status": status,
        "corral.queue_wait_s": round(max(0.0, (started or created) - created), 6),
    }
    if tenant:
        attributes["corral.tenant"] = tenant
    if ended is None:
        attributes["corral.pending"] = True
    message = ""
    if status in ("failed", "cancelled"):
        failure = _json(error)
        message = str(failure.get("message", status))
        attributes["error.type"] = str(failure.get("type", status))
    return Span(trace_id=trace_id, span_id=run_span_id(run_id), parent_id=parent,
                name=f"invoke_workflow {workflow}", start=created,
                end=ended if ended is not None else max(created, started or created),
                status=_RUN_STATUS.get(status, "unset"),
                message=message, attributes=attributes)


def child_parent(run_id: str, parent_id: str) -> str:
    """The span a child run hangs under: its parent's ``run_child`` entry when the id says
    which (the default ``parent/key``), else the parent's run."""
    key = run_id.removeprefix(parent_id + "/")
    return step_span_id(parent_id, key) if key != run_id else run_span_id(parent_id)


def assemble(runs: Sequence[RunRecord], journals: dict[str, list[JournalEntry]],
             stored: Sequence[Span]) -> list[Span]:
    """One tree: each run's span, its journal's spans under it (a child run's under the
    parent's entry for it), the stored spans replacing or joining them. Ordered by start."""
    spans: dict[str, Span] = {}
    child_entry: dict[str, str] = {}
    trace_ids: dict[str, str] = {}
    for run in runs:
        trace_id = trace_ids[run.id] = run.trace_id or trace_id_for(run.id)
        for entry in journals.get(run.id, ()):
            if entry.kind == "now":
                continue
            ended = entry.ended_at
            if ended is None and run.ended_at is not None:  # cut short by the run's end
                ended = max(entry.started_at, run.ended_at)
            span = journal_span(run.id, trace_id, run_span_id(run.id), entry.key, entry.kind,
                                entry.name, entry.status, entry.value, entry.started_at,
                                ended, entry.attempts)
            if entry.ended_at is None and ended is not None:
                span.status, span.message = "error", f"the run ended ({run.status}) first"
            spans[span.span_id] = span
            child = span.attributes.get("corral.child_run.id")
            if isinstance(child, str):
                child_entry[child] = span.span_id
    top = runs[0].id if runs else None
    for run in runs:
        parent = None
        if run.id != top and run.parent_id is not None:
            parent = child_entry.get(run.id) or child_parent(run.id, run.parent_id)
        spans[run_span_id(run.id)] = run_span(
            run.id, trace_ids[run.id], run.workflow, parent, run.tenant, run.created_at,
            run.started_at, run.ended_at, run.status, run.error)
    for span in stored:
        derived = spans.get(span.span_id)
        if derived is not None:  # the stored span says more: keep the journal's attributes too
            span.attributes = {**derived.attributes, **span.attributes}
        spans[span.span_id] = span
    return sorted(spans.values(), key=lambda s: (s.start, s.end))


def component(span: Span) -> str | None:
    operation = span.attributes.get("gen_ai.operation.name") or span.attributes.get(
        "corral.operation")
    return _COMPONENT.get(str(operation)) if operation else None


def summarize(spans: Sequence[Span]) -> dict[str, Any]:
    """Seconds per component (spans nested in a counted span are not counted again), cost
    and tokens, for the whole trace."""
    by_id = {s.span_id: s for s in spans}
    seconds = dict.fromkeys(COMPONENTS, 0.0)
    cost = 0.0
    tokens = {"input": 0, "output": 0}
    for span in spans:
        wait = span.attributes.get("corral.queue_wait_s")
        if isinstance(wait, int | float):
            seconds["queue"] += float(wait)
        kind = component(span)
        if kind is not None and not _inside_counted(span, by_id):
            seconds[kind] += max(0.0, span.end - span.start)
        value = span.attributes.get("corral.cost_usd")
        if isinstance(value, int | float):
            cost += float(value)
        for name, key in (("input", "gen_ai.usage.input_tokens"),
                          ("output", "gen_ai.usage.output_tokens")):
            count = span.attributes.get(key)
            if isinstance(count, int):
                tokens[name] += count
    return {"seconds": {k: round(v, 6) for k, v in seconds.items()},
            "cost_usd": round(cost, 8), "tokens": tokens}


def _inside_counted(span: Span, by_id: dict[str, Span]) -> bool:
    parent = by_id.get(span.parent_id or "")
    while parent is not None:
        if component(parent) is not None:
            return True
        parent = by_id.get(parent.parent_id or "")
    return False


def render(spans: Sequence[Span]) -> list[str]:
    """The tree as lines of text: name, duration, cost and tokens where there are some."""
    children: dict[str | None, list[Span]] = {}
    ids = {s.span_id for s in spans}
    for span in spans:
        children.setdefault(span.parent_id if span.parent_id in ids else None, []).append(span)
    lines: list[str] = []

    def walk(span: Span, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        lines.append(f"{prefix}{branch}{_label(span)}")
        below = children.get(span.span_id, [])
        for i, child in enumerate(below):
            walk(child, prefix if top else prefix + ("   " if last else "│  "),
                 i == len(below) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return lines


def _label(span: Span) -> str:
    a = span.attributes
    parts = [span.name, _duration(span.end - span.start)]
    if isinstance(a.get("corral.cost_usd"), int | float):
        parts.append(f"${a['corral.cost_usd']:.6f}")
    if "gen_ai.usage.input_tokens" in a:
        parts.append(f"{a['gen_ai.usage.input_tokens']}→{a.get('gen_ai.usage.output_tokens', 0)}"
                     " tokens")
    if a.get("corral.cache") in ("hit", "semantic_hit"):
        parts.append(f"cache {a['corral.cache']}")
    wait = a.get("corral.queue_wait_s")
    if isinstance(wait, int | float) and wait:
        parts.append(f"queued {_duration(float(wait))}")
    if a.get("corral.pending"):
        parts.append("(pending)")
    if span.status == "error":
        parts.append(f"ERROR {a.get('error.type', '')}: {span.message}"[:120])
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f}s"
    return f"{seconds * 1000:.1f}ms"


def _json(value: str | bytes | None) -> dict[str, Any]:
    try:
        data = json.loads(value or "{}")
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
