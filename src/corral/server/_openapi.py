"""The control plane's OpenAPI 3.1 document (served at /openapi.json, checked by schemathesis in
the test suite)."""

from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_OPT_NUM = {"type": ["number", "null"]}
_OPT_STR = {"type": ["string", "null"]}

RUN = {
    "type": "object",
    "required": ["id", "workflow", "status", "queue", "priority", "input", "created_at",
                 "attempts", "tenant", "waiting_on"],
    "properties": {
        "id": {"type": "string"}, "workflow": {"type": "string"},
        "status": {"enum": ["queued", "running", "waiting", "completed", "failed",
                            "cancelled"]},
        "queue": {"type": "string"}, "priority": {"type": "integer"}, "run_at": _OPT_NUM,
        "concurrency_key": _OPT_STR, "concurrency_limit": {"type": ["integer", "null"]},
        "parent_id": _OPT_STR, "cancel_requested": {"type": "boolean"},
        "input": {}, "result": {},
        "error": {"type": ["object", "null"]},
        "created_at": _NUM, "started_at": _OPT_NUM, "ended_at": _OPT_NUM,
        "attempts": {"type": "integer"}, "tenant": _OPT_STR,
        "waiting_on": {"type": "array", "items": {"type": "string"}},
    },
}
SPAN = {
    "type": "object",
    "required": ["trace_id", "span_id", "parent_id", "name", "start", "end", "status",
                 "attributes"],
    "properties": {
        "trace_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "span_id": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
        "parent_id": _OPT_STR, "name": {"type": "string"}, "start": _NUM, "end": _NUM,
        "status": {"enum": ["ok", "error", "unset"]}, "message": {"type": "string"},
        "kind": {"type": "string"}, "attributes": {"type": "object"},
    },
}
ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"],
                             "properties": {"message": {"type": "string"},
                                            "type": {"type": "string"},
                                            "code": {"type": "string"}}}},
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _json(_ref("Error"), "error") for code in codes}


_RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]


def spec(workflows: list[str], webhooks: list[str], *,
         metrics_public: bool = False) -> dict[str, Any]:
    workflow_name = {"type": "string", **({"enum": workflows} if workflows else {})}
    run_by_id = {"parameters": [_RUN_ID]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "corral control plane", "version": "1"},
        "components": {
            "schemas": {"Run": RUN, "Span": SPAN, "Error": ERROR},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "a tenant's key (corral keys create) or the master key; "
                               "/metrics takes the master key or the scrape token "
                               "([server] metrics_key_env), never a tenant's key"}},
        },
        "security": _SECURED,
        "paths": {
            "/healthz": {"get": {"security": [], "operationId": "health", "responses": {
                "200": _json({"type": "object"}), **_errors(503)}}},
            "/metrics": {"get": {
                "operationId": "metrics", "security": [] if metrics_public else _SECURED,
                "summary": "Prometheus metrics of every tenant: the master key or the scrape "
                           "token; a tenant's key is 403",
                "responses": {"200": {"description": "the Prometheus text format", "content": {
                    "text/plain": {"schema": {"type": "string"}}}},
                    **_errors(*(() if metrics_public else (401, 403)), 503)}}},
            "/v1/runs": {
                "post": {
                    "operationId": "submitRun",
                    "summary": "Start a run; Idempotency-Key makes it safe to retry",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "required": False,
                         "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
                    ],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {
                            "type": "object", "required": ["workflow"],
                            "additionalProperties": False,
                            "properties": {
                                "workflow": workflow_name, "input": {},
                                "queue": {"type": "string", "minLength": 1},
                                "priority": {"type": "integer", "minimum": -1000,
                                             "maximum": 1000},
                                "delay": {"type": "number", "minimum": 0,
                                          "maximum": 366 * 86400},
                                "run_at": {"type": "string", "format": "date-time"},
                            }}}}},
                    "responses": {"201": _json(_ref("Run"), "started"),
                                  "200": _json(_ref("Run"), "already started with this key"),
                                  **_errors(400, 401, 404, 409, 413, 503)},
                },
                "get": {
                    "operationId": "listRuns", "summary": "Runs, newest first",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"enum": [
                            "queued", "running", "waiting", "completed", "failed",
                            "cancelled"]}},
                        {"name": "workflow", "in": "query", "schema": {"type": "string"}},
                        {"name": "tenant", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _json({
                        "type": "object", "required": ["runs", "next_cursor"],
                        "properties": {"runs": {"type": "array", "items": _ref("Run")},
                                       "next_cursor": _OPT_STR}}),
                        **_errors(400, 401, 503)},
                },
            },
            "/v1/runs/{run_id}": {**run_by_id, "get": {
                "operationId": "getRun",
                "responses": {"200": _json(_ref("Run")), **_errors(401, 404, 503)}}},
            "/v1/runs/{run_id}/trace": {**run_by_id, "get": {
                "operationId": "getTrace", "summary": "The run's spans, time and cost",
                "responses": {"200": _json({
                    "type": "object",
                    "required": ["trace_id", "spans", "seconds", "cost_usd", "tokens"],
                    "properties": {
                        "trace_id": _OPT_STR,
                        "spans": {"type": "array", "items": _ref("Span")},
                        "seconds": {"type": "object",
                                    "additionalProperties": {"type": "number"}},
                        "cost_usd": _NUM,
                        "tokens": {"type": "object",
                                   "additionalProperties": {"type": "integer"}}}}),
                    **_errors(401, 404, 503)}}},
            "/v1/runs/{run_id}/events": {**run_by_id, "get": {
                "operationId": "runEvents",
                "summary": "Server-sent events: run (status), step (journal entries), end",
                "responses": {"200": {"description": "an event stream", "content": {
                    "text/event-stream": {"schema": {"type": "string"}}}},
                    **_errors(401, 404, 503)}}},
            "/v1/runs/{run_id}/cancel": {**run_by_id, "post": {
                "operationId": "cancelRun",
                "responses": {"202": _json(_ref("Run"), "cancel requested"),
                              **_errors(401, 404, 409, 503)}}},
            "/v1/runs/{run_id}/signals/{name}": {
                "parameters": [_RUN_ID, {"name": "name", "in": "path", "required": True,
                                         "schema": {"type": "string"}}],
                "post": {
                    "operationId": "signalRun", "summary": "Send a signal (an approval...)",
                    "requestBody": {"required": False, "content": {"application/json": {
                        "schema": {"type": "object", "additionalProperties": False,
                                   "properties": {"value": {}}}}}},
                    "responses": {"202": _json({
                        "type": "object", "required": ["run_id", "signal", "accepted"],
                        "properties": {"run_id": {"type": "string"},
                                       "signal": {"type": "string"},
                                       "accepted": {"type": "boolean"}}}, "sent"),
                        **_errors(400, 401, 404, 409, 413, 503)}}},
            "/v1/approvals": {"get": {
                "operationId": "listApprovals",
                "summary": "Runs waiting for a signal a person should send",
                "responses": {"200": _json({
                    "type": "object", "required": ["approvals"],
                    "properties": {"approvals": {"type": "array", "items": {
                        "type": "object", "required": ["run", "signal"],
                        "properties": {"run": _ref("Run"), "signal": {"type": "string"}}}}}}),
                    **_errors(401, 503)}}},
            "/v1/costs": {"get": {
                "operationId": "costs", "summary": "Cost over time, from the gateway's ledger",
                "parameters": [
                    {"name": "by", "in": "query",
                     "schema": {"enum": ["tenant", "agent", "model", "workflow"]}},
                    {"name": "bucket", "in": "query",
                     "schema": {"type": "integer", "minimum": 60, "maximum": 31 * 86400}},
                    {"name": "since", "in": "query", "schema": {"type": "number"}},
                ],
                "responses": {"200": _json({
                    "type": "object", "required": ["by", "bucket", "series", "total_usd"],
                    "properties": {
                        "by": {"type": "string"}, "bucket": {"type": "integer"},
                        "total_usd": _NUM,
                        "series": {"type": "array", "items": {
                            "type": "object", "required": ["key", "points"],
                            "properties": {"key": {"type": "string"}, "points": {
                                "type": "array", "items": {
                                    "type": "array", "items": _NUM}}}}}}}),
                    **_errors(400, 401, 503)}}},
            "/v1/audit": {"get": {
                "operationId": "audit", "summary": "The decision log's verification status",
                "responses": {"200": _json({
                    "type": "object", "required": ["enabled", "size", "verified"],
                    "properties": {"enabled": {"type": "boolean"}, "size": {"type": "integer"},
                                   "verified": {"type": ["boolean", "null"]}, "root": _OPT_STR,
                                   "problem": _OPT_STR, "checked_at": _NUM}}),
                    **_errors(401, 503)}}},
            "/v1/hooks/{name}": {
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", **(
                                    {"enum": webhooks} if webhooks else {})}}],
                "post": {
                    "operationId": "webhook", "security": [],
                    "summary": "Start the webhook's workflow; X-Corral-Signature is "
                               "sha256=<hex HMAC-SHA256 of '<X-Corral-Timestamp>.<body>'>",
                    "parameters": [
                        {"name": "X-Corral-Signature", "in": "header", "required": True,
                         "schema": {"type": "string"}},
                        {"name": "X-Corral-Timestamp", "in": "header", "required": True,
                         "description": "Unix seconds, within the webhook's tolerance "
                                        "(300 s unless tolerance_s says otherwise)",
                         "schema": {"type": "string"}},
                        {"name": "X-Corral-Delivery", "in": "header", "required": False,
                         "schema": {"type": "string"}},
                    ],
                    "requestBody": {"required": False,
                                    "content": {"application/json": {"schema": {}}}},
                    "responses": {"201": _json(_ref("Run"), "started"),
                                  "200": _json(_ref("Run"), "this delivery started it before"),
                                  **_errors(400, 401, 404, 409, 413, 503)}}},
        },
    }
