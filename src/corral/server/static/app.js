// The corral dashboard: runs, a run's trace as a waterfall, costs, approvals, the audit log.
// Plain JavaScript, no build step, nothing loaded from anywhere but this server.
"use strict";

(() => {
  const KEY_STORAGE = "corral.apiKey";
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const VIEWS = ["runs", "run", "approvals", "costs", "audit"];
  const COMPONENTS = ["workflow", "agent", "model", "tool", "retrieval", "waiting", "steps"];
  const SUMMARY = ["model", "tool", "retrieval", "waiting", "steps"];  // the trace's seconds
  const PALETTE = ["#2563eb", "#f97316", "#16a34a", "#a855f7", "#dc2626", "#0891b2",
    "#ca8a04", "#db2777", "#64748b"];
  const NO_KEY = "Enter an API key (corral keys create --tenant NAME prints one) " +
    "in the field at the top right.";

  const state = {
    view: "runs", runId: null, gen: 0, timer: null,
    filter: "", workflow: "", cursors: [null], page: 0, nextCursor: null,
    costsBy: "tenant", costsRange: "86400:3600",
    runCosts: new Map(), costsInFlight: new Set(),
    sent: new Map(), openSpans: new Set(), openDetails: new Set(), trace: null, approvals: [],
  };

  const $ = (id) => document.getElementById(id);

  // h("td", {class: "num", dataset: {run: id}}, "text", node...): a DOM node, text escaped.
  // Rendered nodes carry no listeners (the containers' delegated ones act on data-*), so a
  // refresh can update them in place.
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "style") Object.assign(node.style, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // Make node's children look like `children` (null/false parts skipped), keeping the nodes
  // already there where they match: by data-key, else by position. A refresh every second
  // then neither flickers nor takes away what the user holds (focus, a button mid-click).
  function fill(node, ...children) {
    const wanted = children.flat().filter((c) => c !== null && c !== undefined && c !== false)
      .map((c) => (c instanceof Node ? c : document.createTextNode(String(c))));
    const keyed = new Map();
    for (const child of node.childNodes) if (keyOf(child) !== undefined) keyed.set(keyOf(child), child);
    wanted.forEach((want, i) => {
      const key = keyOf(want);
      let have = key !== undefined ? keyed.get(key) : node.childNodes[i];
      if (key === undefined && have && keyOf(have) !== undefined) have = undefined;
      const use = have && morph(have, want) ? have : want;
      if (node.childNodes[i] !== use) node.insertBefore(use, node.childNodes[i] || null);
    });
    while (node.childNodes.length > wanted.length) node.lastChild.remove();
  }

  function keyOf(node) {
    return node.nodeType === Node.ELEMENT_NODE ? node.getAttribute("data-key") ?? undefined
      : undefined;
  }

  // Update `have` in place to look like `want`; false if they are different kinds of node.
  function morph(have, want) {
    if (have.nodeType !== want.nodeType || have.nodeName !== want.nodeName) return false;
    if (have.nodeType === Node.TEXT_NODE) {
      if (have.data !== want.data) have.data = want.data;
      return true;
    }
    if (have.nodeType !== Node.ELEMENT_NODE || keyOf(have) !== keyOf(want)) return false;
    if (have.isEqualNode(want)) return true;
    for (const { name } of [...have.attributes]) if (!want.hasAttribute(name)) have.removeAttribute(name);
    for (const { name, value } of [...want.attributes]) {
      if (have.getAttribute(name) !== value) have.setAttribute(name, value);
    }
    fill(have, ...want.childNodes);
    return true;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // ---- formatting ----

  function seconds(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "—";
    const v = Math.max(0, value);
    if (v < 1) return `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms`;
    if (v < 60) return `${v.toFixed(v < 10 ? 2 : 1)} s`;
    if (v < 3600) return `${Math.floor(v / 60)}m ${String(Math.floor(v % 60)).padStart(2, "0")}s`;
    if (v < 86400) return `${Math.floor(v / 3600)}h ${String(Math.floor((v % 3600) / 60)).padStart(2, "0")}m`;
    return `${Math.floor(v / 86400)}d ${Math.floor((v % 86400) / 3600)}h`;
  }

  function usd(value) {
    if (typeof value !== "number") return "—";
    if (value === 0) return "$0";
    if (value < 0.01) {  // three significant digits, never an exponent: $0.0000138
      return `$${value.toFixed(Math.min(10, 2 - Math.floor(Math.log10(value))))}`;
    }
    return `$${value.toFixed(value < 1 ? 4 : 2)}`;
  }

  function when(ts) {
    if (!ts) return "—";
    const d = new Date(ts * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString() : d.toLocaleString();
  }

  function iso(ts) {
    return ts ? new Date(ts * 1000).toISOString() : "";
  }

  function runDuration(run) {
    if (!run.started_at) return null;
    return (run.ended_at || Date.now() / 1000) - run.started_at;
  }

  function shortJson(value, width = 80) {
    if (value === null || value === undefined) return "";
    const text = JSON.stringify(value);
    return text.length > width ? `${text.slice(0, width - 1)}…` : text;
  }

  const badge = (status) => h("span", { class: `badge st-${status}`, "data-testid": "run-status" },
    status);

  // ---- the API ----

  class ApiError extends Error {
    constructor(status, message, type) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  function key() {
    return localStorage.getItem(KEY_STORAGE) || "";
  }

  async function api(path, options = {}) {
    const headers = { Accept: "application/json" };
    if (key()) headers.Authorization = `Bearer ${key()}`;
    const init = { method: options.method || "GET", headers };
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, `the server did not answer (${err.message})`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(response.status,
        error.message || `${response.status} ${response.statusText}`.trim(), error.type);
    }
    return data;
  }

  const enc = encodeURIComponent;

  // A refresh's error goes with the next good refresh; an action's (sticky) stays until clicked.
  function report(err, sticky = false) {
    if (err instanceof ApiError && err.status === 401) {
      showAuth(`Not authorized: ${NO_KEY.charAt(0).toLowerCase()}${NO_KEY.slice(1)} ` +
        `(The server said: ${err.message})`);
    } else {
      const box = $("error-message");
      box.textContent = err instanceof ApiError && err.status
        ? `${err.status}: ${err.message}` : `Error: ${err.message}`;
      box.title = sticky ? "click to dismiss" : "";
      box.dataset.sticky = sticky ? "yes" : "";
      box.hidden = false;
    }
  }

  function showAuth(text) {
    const box = $("auth-message");
    box.textContent = text;
    box.hidden = false;
  }

  function clearNotices() {
    $("auth-message").hidden = true;
    if (!$("error-message").dataset.sticky) $("error-message").hidden = true;
  }

  // ---- the refresh loop: the current view every 2 s (1 s for a run still going) ----

  async function tick() {
    clearTimeout(state.timer);
    const gen = ++state.gen;
    let delay = 2000;
    if (!key()) {
      showAuth(NO_KEY);
      return;  // nothing to show until there is a key; the key form calls tick()
    }
    try {
      const views = { runs: refreshRuns, run: refreshRun, approvals: refreshApprovals,
        costs: refreshCosts, audit: refreshAudit };
      const work = [views[state.view](gen)];
      if (state.view !== "approvals") work.push(refreshApprovals(gen));
      const delays = await Promise.all(work);
      if (gen === state.gen) {
        clearNotices();
        delay = delays[0] || delay;
      }
    } catch (err) {
      if (gen === state.gen) report(err);
    }
    if (gen === state.gen) state.timer = setTimeout(tick, delay);
  }

  // ---- runs ----

  async function refreshRuns(gen) {
    const params = new URLSearchParams({ limit: "50" });
    if (state.filter) params.set("status", state.filter);
    if (state.workflow) params.set("workflow", state.workflow);
    const cursor = state.cursors[state.page];
    if (cursor) params.set("cursor", cursor);
    const data = await api(`/v1/runs?${params}`);
    if (gen !== state.gen) return 0;
    state.nextCursor = data.next_cursor || null;
    renderRuns(data.runs || []);
    loadRunCosts(data.runs || []);
    return 2000;
  }

  function renderRuns(runs) {
    const body = $("runs-body");
    fill(body, ...runs.map((run) => {
      return h("tr", {
        dataset: { key: run.id, run: run.id, status: run.status }, "data-testid": "run-row",
        tabindex: 0,
      },
      h("td", { class: "mono", title: run.id }, run.id.length > 14 ? `${run.id.slice(0, 12)}…` : run.id),
      h("td", { "data-testid": "run-workflow" }, run.workflow),
      h("td", null, badge(run.status),
        run.waiting_on && run.waiting_on.length
          ? h("span", { class: "muted" }, ` on ${run.waiting_on.join(", ")}`) : null),
      h("td", null, run.tenant || "—"),
      h("td", { title: iso(run.created_at) }, when(run.created_at)),
      h("td", { class: "num" }, run.started_at ? seconds(runDuration(run)) : run.status),
      h("td", { class: "num", dataset: { costFor: run.id } }, costText(run)));
    }));
    $("runs-empty").hidden = runs.length > 0;
    $("runs-newer").disabled = state.page === 0;
    $("runs-older").disabled = !state.nextCursor;
  }

  function costText(run) {
    if (typeof run.cost_usd === "number") return usd(run.cost_usd);
    const known = state.runCosts.get(run.id);
    return known ? usd(known.usd) : "…";
  }

  // The list has no cost; a run's trace has. A finished run's cost is fetched once, a live
  // run's at most every 10 s, four traces at a time.
  function loadRunCosts(runs) {
    const now = Date.now();
    const due = runs.filter((run) => {
      if (typeof run.cost_usd === "number" || state.costsInFlight.has(run.id)) return false;
      const known = state.runCosts.get(run.id);
      return !known || (!known.final && now - known.at > 10000);
    });
    const next = () => {
      const run = due.shift();
      if (!run) return;
      state.costsInFlight.add(run.id);
      api(`/v1/runs/${enc(run.id)}/trace`)
        .then((trace) => {
          state.runCosts.set(run.id, { usd: trace.cost_usd || 0, final: TERMINAL.has(run.status),
            at: Date.now() });
          const cell = document.querySelector(`td[data-cost-for="${CSS.escape(run.id)}"]`);
          if (cell) cell.textContent = usd(trace.cost_usd || 0);
        })
        .catch(() => state.runCosts.set(run.id, { usd: null, final: false, at: Date.now() }))
        .finally(() => { state.costsInFlight.delete(run.id); next(); });
    };
    for (let i = 0; i < 4; i++) next();
  }

  // ---- one run ----

  async function refreshRun(gen) {
    const id = state.runId;
    const [run, trace] = await Promise.all([
      api(`/v1/runs/${enc(id)}`),
      api(`/v1/runs/${enc(id)}/trace`).catch((err) => {
        if (err.status === 401) throw err;
        return { spans: [], error: err.message };
      }),
    ]);
    if (gen !== state.gen) return 0;
    // a span left pending by a run that has ended (a wait it was cancelled in) ends with it
    trace.until = TERMINAL.has(run.status) ? run.ended_at || null : null;
    state.trace = trace;
    renderRunHeader(run);
    renderSummary(trace, live(trace));
    renderWaterfall(trace);
    return TERMINAL.has(run.status) ? 5000 : 1000;
  }

  function details(name, title, value) {
    return h("details", { open: state.openDetails.has(name), dataset: { name } },
      h("summary", null, title), h("pre", null, JSON.stringify(value, null, 2)));
  }

  function renderRunHeader(run) {
    const field = (label, ...value) => [h("dt", null, label), h("dd", null, ...value)];
    const cancel = TERMINAL.has(run.status) ? null : h("button", {
      type: "button", class: "danger", id: "cancel-run", "data-testid": "cancel-run",
      dataset: { run: run.id },
    }, "Cancel run");
    fill($("run-header"),
      h("div", { class: "run-title" },
        h("h2", { "data-testid": "detail-workflow" }, run.workflow),
        badge(run.status), cancel),
      h("dl", { class: "fields" },
        field("id", h("span", { class: "mono", "data-testid": "run-id" }, run.id)),
        field("tenant", run.tenant || "—"),
        field("queue", `${run.queue || "default"} (priority ${run.priority ?? 0})`),
        field("created", h("span", { title: iso(run.created_at) }, when(run.created_at))),
        field("started", h("span", { title: iso(run.started_at) }, when(run.started_at))),
        field("ended", h("span", { title: iso(run.ended_at) }, when(run.ended_at))),
        field("duration", run.started_at ? seconds(runDuration(run)) : "—"),
        field("attempts", String(run.attempts ?? "—")),
        run.parent_id ? field("parent", h("a", { href: `#/runs/${enc(run.parent_id)}`,
          class: "mono" }, run.parent_id)) : null,
        run.waiting_on && run.waiting_on.length
          ? field("waiting on", run.waiting_on.join(", ")) : null),
      run.error ? h("div", { class: "notice bad", "data-testid": "run-error" },
        h("strong", null, run.error.type || "Error"), `: ${run.error.message || ""}`) : null,
      details("input", "input", run.input),
      run.result !== null && run.result !== undefined ? details("result", "result", run.result) : null,
    );
  }

  // The server counts a span still going (a wait, say) as lasting nothing so far; count it up
  // to now, as the server does ended ones: not again inside a span already counted.
  function live(trace) {
    const secs = { ...(trace.seconds || {}) };
    const now = trace.until || Date.now() / 1000;
    const byId = new Map((trace.spans || []).map((span) => [span.span_id, span]));
    const counted = (span) => SUMMARY.includes(componentOf(span));
    for (const span of trace.spans || []) {
      if (!(span.attributes || {})["corral.pending"] || !counted(span)) continue;
      let parent = byId.get(span.parent_id);
      while (parent && !counted(parent)) parent = byId.get(parent.parent_id);
      if (!parent) {
        const kind = componentOf(span);
        secs[kind] = (secs[kind] || 0) + Math.max(0, now - span.end);
      }
    }
    return secs;
  }

  function renderSummary(trace, secs) {
    const names = ["queue", ...SUMMARY];
    const total = names.reduce((sum, n) => sum + (secs[n] || 0), 0);
    const bar = h("div", { class: "stack" }, names.filter((n) => secs[n] > 0).map((n) =>
      h("span", { class: `comp-${n}`, title: `${n}: ${seconds(secs[n])}`,
        style: { width: `${(100 * secs[n]) / total}%` } })));
    const tokens = trace.tokens || {};
    fill($("run-summary"),
      total > 0 ? bar : null,
      h("ul", { class: "chips" },
        names.map((n) => h("li", { "data-component": n, "data-testid": "component-seconds" },
          h("i", { class: `swatch comp-${n}` }), `${n} `, h("b", null, seconds(secs[n] || 0)))),
        h("li", { "data-testid": "trace-cost" }, "cost ", h("b", null, usd(trace.cost_usd || 0))),
        h("li", { "data-testid": "trace-tokens" }, "tokens ",
          h("b", null, `${(tokens.input || 0).toLocaleString()} in / ` +
            `${(tokens.output || 0).toLocaleString()} out`))),
      trace.error ? h("p", { class: "muted" }, `trace unavailable: ${trace.error}`) : null,
    );
  }

  function componentOf(span) {
    const a = span.attributes || {};
    const op = a["gen_ai.operation.name"];
    if (op === "invoke_workflow") return "workflow";
    if (op === "invoke_agent" || op === "create_agent") return "agent";
    if (op === "chat" || op === "text_completion" || op === "embeddings" ||
      op === "generate_content") return "model";
    if (op === "execute_tool") return "tool";
    if (op === "retrieval") return "retrieval";
    const corral = a["corral.operation"];
    if (corral === "wait") return "waiting";
    if (corral === "step") return "steps";
    if (corral === "run_child") return "workflow";
    return "other";
  }

  function renderWaterfall(trace) {
    const box = $("waterfall");
    const spans = trace.spans || [];
    if (!spans.length) {
      fill(box, h("p", { class: "empty" }, "No spans recorded for this run yet."));
      return;
    }
    const now = trace.until || Date.now() / 1000;
    const pending = (span) => Boolean((span.attributes || {})["corral.pending"]);
    const going = (span) => pending(span) && !trace.until;
    const endOf = (span) => (pending(span) ? Math.max(span.end, now) : span.end);
    const ids = new Set(spans.map((span) => span.span_id));
    const children = new Map();
    for (const span of spans) {
      const parent = span.parent_id && ids.has(span.parent_id) ? span.parent_id : null;
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(span);
    }
    for (const list of children.values()) list.sort((a, b) => a.start - b.start || a.end - b.end);
    const roots = children.get(null) || [];
    const t0 = Math.min(...roots.map((span) => span.start));
    const t1 = Math.max(...spans.map(endOf));
    const total = Math.max(t1 - t0, 1e-6);

    const rows = [];
    const walk = (span, depth) => {
      rows.push([span, depth]);
      for (const child of children.get(span.span_id) || []) walk(child, depth + 1);
    };
    roots.forEach((root) => walk(root, 0));

    const axis = h("div", { class: "wf-row wf-axis" }, h("div", { class: "wf-label" }, "span"),
      h("div", { class: "wf-track" }, [0, 0.25, 0.5, 0.75, 1].map((f) =>
        h("span", { class: "tick", style: { left: `${f * 100}%` } }, seconds(f * total)))),
      h("div", { class: "wf-dur" }, "duration"), h("div", { class: "wf-cost" }, "cost"));

    fill(box, axis, ...rows.flatMap(([span, depth]) => {
      const a = span.attributes || {};
      const comp = componentOf(span);
      const duration = endOf(span) - span.start;
      const left = ((span.start - t0) / total) * 100;
      const width = Math.max((duration / total) * 100, 0.4);
      const open = state.openSpans.has(span.span_id);
      const tokens = "gen_ai.usage.input_tokens" in a
        ? `${a["gen_ai.usage.input_tokens"]}→${a["gen_ai.usage.output_tokens"] ?? 0} tok` : "";
      const tip = [`${span.name}`, `starts +${seconds(span.start - t0)}`,
        `lasts ${seconds(duration)}${going(span) ? " (still going)" : ""}` +
          `${pending(span) && !going(span) ? " (cut off: the run ended)" : ""}`,
        span.status === "error" ? `error ${a["error.type"] || ""}: ${span.message}` : ""]
        .filter(Boolean).join("\n");
      const row = h("div", {
        class: `wf-row${span.status === "error" ? " error" : ""}`, "data-testid": "span-row",
        dataset: { key: span.span_id, spanName: span.name, spanId: span.span_id,
          component: comp, depth: String(depth), status: span.status },
        title: tip,
      },
      h("div", { class: "wf-label", style: { paddingLeft: `${depth * 16 + 4}px` } },
        h("i", { class: `swatch comp-${comp}` }), span.name,
        span.status === "error" ? h("span", { class: "err-mark", title: span.message }, " ✗") : null),
      h("div", { class: "wf-track" },
        h("div", { class: `wf-bar comp-${comp}${going(span) ? " pending" : ""}`,
          "data-testid": "span-bar", style: { left: `${Math.min(left, 99.6)}%`, width: `${width}%` } })),
      h("div", { class: "wf-dur" }, going(span) ? `${seconds(duration)}…` : seconds(duration)),
      h("div", { class: "wf-cost", title: tokens },
        typeof a["corral.cost_usd"] === "number" ? usd(a["corral.cost_usd"]) : tokens));
      const more = open ? h("pre", { class: "wf-attrs", "data-testid": "span-attributes",
        dataset: { key: `${span.span_id}:attributes` } },
        JSON.stringify({ status: span.status, message: span.message || undefined, ...a }, null, 2))
        : null;
      return more ? [row, more] : [row];
    }));
    box.append(h("ul", { class: "chips legend" }, COMPONENTS.map((c) =>
      h("li", null, h("i", { class: `swatch comp-${c}` }), c))));
  }

  // ---- approvals ----

  async function refreshApprovals(gen) {
    const data = await api("/v1/approvals");
    if (gen !== state.gen) return 0;
    const items = data.approvals || [];
    const count = $("approvals-count");
    count.textContent = String(items.length);
    count.hidden = items.length === 0;
    const listed = new Set(items.map((item) => `${item.run.id}/${item.signal}`));
    for (const [sent, what] of [...state.sent]) {
      if (!listed.has(sent) && what !== "sending") state.sent.delete(sent);
    }
    state.approvals = items;
    if (state.view === "approvals") renderApprovals(items);
    return 2000;
  }

  function renderApprovals(items) {
    fill($("approvals-list"), ...items.map(({ run, signal }) => {
      const id = `${run.id}/${signal}`;
      const sent = state.sent.get(id);
      const status = h("span", { class: "muted", "data-testid": "approval-status" },
        sent === "sending" ? "sending…" : sent ? `${sent}; waiting for the run to take it` : "");
      const buttons = [
        h("button", { type: "button", class: "approve", disabled: Boolean(sent),
          dataset: { action: "approve", run: run.id, signal }, "data-testid": "approve" },
        "Approve"),
        h("button", { type: "button", class: "deny", disabled: Boolean(sent),
          dataset: { action: "deny", run: run.id, signal }, "data-testid": "deny" }, "Deny"),
      ];
      return h("li", { "data-testid": "approval", dataset: { key: id, run: run.id, signal } },
        h("div", { class: "approval-what" },
          h("div", null, h("strong", null, run.workflow), " waits for ", h("code", null, signal)),
          h("div", { class: "muted" },
            h("a", { href: `#/runs/${enc(run.id)}`, class: "mono" }, run.id),
            ` · tenant ${run.tenant || "—"} · since ${when(run.started_at || run.created_at)}`),
          run.input !== null && run.input !== undefined
            ? h("div", { class: "mono small" }, shortJson(run.input, 120)) : null),
        h("div", { class: "approval-actions" }, buttons, status));
    }));
    $("approvals-empty").hidden = items.length > 0;
  }

  // ---- costs ----

  async function refreshCosts(gen) {
    const [range, bucket] = state.costsRange.split(":").map(Number);
    const since = Math.floor(Date.now() / 1000 - range);
    const data = await api(`/v1/costs?by=${enc(state.costsBy)}&bucket=${bucket}&since=${since}`);
    if (gen !== state.gen) return 0;
    $("costs-total").textContent = `total ${usd(data.total_usd || 0)}`;
    renderChart(data, since, data.bucket || bucket);
    return 10000;
  }

  function niceStep(raw) {
    const power = 10 ** Math.floor(Math.log10(raw));
    const f = raw / power;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * power;
  }

  function renderChart(data, since, bucket) {
    const box = $("costs-chart");
    let series = (data.series || []).map((one) => ({
      key: one.key === null || one.key === "" ? "(none)" : String(one.key),
      points: one.points || [],
      total: (one.points || []).reduce((sum, p) => sum + (p[1] || 0), 0),
    })).sort((a, b) => b.total - a.total);
    if (series.length > PALETTE.length) {  // the biggest eight, the rest as one
      const rest = series.slice(PALETTE.length - 1);
      const merged = new Map();
      for (const one of rest) for (const [t, v] of one.points) merged.set(t, (merged.get(t) || 0) + v);
      series = [...series.slice(0, PALETTE.length - 1), { key: `${rest.length} others`,
        points: [...merged], total: rest.reduce((sum, one) => sum + one.total, 0) }];
    }
    series.forEach((one, i) => { one.color = PALETTE[i % PALETTE.length]; });
    if (!series.some((one) => one.total > 0)) {
      fill(box, h("p", { class: "empty", "data-testid": "costs-empty" },
        "No model spend in this range (costs come from the gateway's ledger)."));
      return;
    }
    const W = 860, H = 320, L = 64, R = 12, T = 12, B = 52;
    const stacks = new Map();  // bucket start -> [[series, from, to]]
    let top = 0;
    for (const one of series) {
      for (const [t, v] of one.points) {
        if (!(v > 0)) continue;
        const list = stacks.get(t) || [];
        const from = list.length ? list[list.length - 1][2] : 0;
        list.push([one, from, from + v]);
        stacks.set(t, list);
        top = Math.max(top, from + v);
      }
    }
    const starts = [...stacks.keys()];
    const xMin = Math.min(Math.floor(since / bucket) * bucket, ...starts);
    const xMax = Math.max(Date.now() / 1000, ...starts.map((t) => t + bucket));
    const x = (t) => L + ((t - xMin) / (xMax - xMin)) * (W - L - R);
    const step = niceStep(top / 4 || 1);
    const yTop = Math.ceil(top / step) * step;
    const y = (v) => H - B - (v / yTop) * (H - B - T);
    const digits = step >= 1 ? 0 : Math.min(6, Math.ceil(-Math.log10(step)));
    const hourly = bucket >= 86400 ? "day" : bucket >= 3600 ? `${bucket / 3600} h` : `${bucket / 60} min`;
    const label = (t) => {
      const d = new Date(t * 1000);
      return bucket >= 86400 ? d.toLocaleDateString(undefined, { month: "short", day: "numeric" })
        : d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    };

    const grid = [];
    for (let v = 0; v <= yTop + step / 2; v += step) {
      grid.push(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }),
        s("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, `$${v.toFixed(digits)}`));
    }
    const ticks = [];
    const every = Math.max(1, Math.ceil((xMax - xMin) / bucket / 8));
    for (let t = Math.ceil(xMin / bucket) * bucket; t <= xMax; t += bucket * every) {
      ticks.push(s("line", { x1: x(t), x2: x(t), y1: H - B, y2: H - B + 4, class: "axis" }),
        s("text", { x: x(t), y: H - B + 17, "text-anchor": "middle", class: "tick" }, label(t)));
    }
    const barWidth = Math.max(1, x(xMin + bucket) - x(xMin) - 2);
    const bars = [];
    for (const [t, list] of stacks) {
      for (const [one, from, to] of list) {
        bars.push(s("rect", { x: x(t) + 1, width: barWidth, y: y(to),
          height: Math.max(0.5, y(from) - y(to)), fill: one.color, "data-series": one.key,
          class: "bar" }, s("title", null, `${one.key} · ${label(t)} · ${usd(to - from)}`)));
      }
    }
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-testid": "costs-svg",
      "aria-label": `cost per ${hourly} by ${data.by || state.costsBy}` },
    grid, bars, ticks,
    s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }),
    s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }),
    s("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", class: "axis-title" },
      `time (local), one bar per ${hourly}`),
    s("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis-title",
      transform: `rotate(-90 14 ${(T + H - B) / 2})` }, `USD per ${hourly}`));
    const legend = h("ul", { class: "chips legend", "data-testid": "costs-legend" },
      series.map((one) => h("li", { dataset: { key: one.key } },
        h("i", { class: "swatch", style: { background: one.color } }), `${one.key} `,
        h("b", null, usd(one.total)))));
    fill(box, svg, legend);
  }

  // ---- audit ----

  async function refreshAudit(gen) {
    const data = await api("/v1/audit");
    if (gen !== state.gen) return 0;
    let mark;
    let text;
    let which;
    if (!data.enabled) {
      [mark, text, which] = ["–", "not enabled on this server", "disabled"];
    } else if (data.verified === true) {
      [mark, text, which] = ["✓", "verified", "verified"];
    } else if (data.verified === false || data.problem) {
      [mark, text, which] = ["✗", `problem: ${data.problem || "verification failed"}`, "problem"];
    } else {
      [mark, text, which] = ["…", "not checked yet", "unchecked"];
    }
    const row = (label, value) => [h("dt", null, label), h("dd", null, value)];
    fill($("audit-status"),
      h("p", { class: `audit-state ${which}`, "data-testid": "audit-state", dataset: { state: which } },
        h("span", { class: "mark" }, mark), ` ${text}`),
      data.enabled ? h("dl", { class: "fields" },
        row("records", (data.size ?? 0).toLocaleString()),
        row("root", h("span", { class: "mono", "data-testid": "audit-root" }, data.root || "—")),
        row("checked", h("span", { title: iso(data.checked_at) }, when(data.checked_at)))) : null);
    return 10000;
  }

  // ---- routing and controls ----

  function route() {
    const parts = location.hash.replace(/^#\/?/, "").split("/");
    let view = parts[0] || "runs";
    if (view === "runs" && parts[1]) {
      const id = decodeURIComponent(parts[1]);
      if (id !== state.runId) {
        state.runId = id;
        state.openSpans.clear();
        state.trace = null;
        fill($("run-header"));
        fill($("run-summary"));
        fill($("waterfall"), h("p", { class: "empty" }, "loading…"));
      }
      view = "run";
    }
    if (!VIEWS.includes(view)) view = "runs";
    state.view = view;
    for (const section of document.querySelectorAll("main > section")) {
      section.hidden = section.dataset.view !== view;
    }
    for (const link of document.querySelectorAll("#nav a")) {
      link.classList.toggle("on", link.dataset.nav === (view === "run" ? "runs" : view));
    }
    tick();
  }

  function choose(container, attr, value) {
    for (const b of container.querySelectorAll("button")) b.classList.toggle("on", b.dataset[attr] === value);
  }

  async function answer(button) {
    const { run, signal, action } = button.dataset;
    const id = `${run}/${signal}`;
    state.sent.set(id, "sending");
    renderApprovals(state.approvals);
    try {
      await api(`/v1/runs/${enc(run)}/signals/${enc(signal)}`,
        { method: "POST", body: { value: { approved: action === "approve" } } });
      state.sent.set(id, action === "approve" ? "approved" : "denied");
    } catch (err) {
      state.sent.delete(id);
      report(err, true);
    }
    renderApprovals(state.approvals);
    tick();
  }

  async function cancel(button) {
    if (!window.confirm(`Cancel run ${button.dataset.run} and its children?`)) return;
    button.disabled = true;
    try {
      await api(`/v1/runs/${enc(button.dataset.run)}/cancel`, { method: "POST", body: {} });
    } catch (err) {
      report(err, true);
    }
    tick();
  }

  function setup() {
    $("api-key").value = key();
    $("error-message").addEventListener("click", (event) => {
      event.currentTarget.hidden = true;
      event.currentTarget.dataset.sticky = "";
    });
    const openRun = (event) => {
      const row = event.target.closest("tr[data-run]");
      if (row) location.hash = `#/runs/${enc(row.dataset.run)}`;
    };
    $("runs-body").addEventListener("click", openRun);
    $("runs-body").addEventListener("keydown", (event) => { if (event.key === "Enter") openRun(event); });
    $("run-header").addEventListener("click", (event) => {
      const button = event.target.closest("#cancel-run");
      if (button && !button.disabled) cancel(button);
    });
    $("run-header").addEventListener("toggle", (event) => {  // (toggle does not bubble)
      const name = event.target.dataset.name;
      if (name) (event.target.open ? state.openDetails.add(name) : state.openDetails.delete(name));
    }, true);
    $("waterfall").addEventListener("click", (event) => {
      const row = event.target.closest(".wf-row[data-span-id]");
      if (!row || !state.trace) return;
      const id = row.dataset.spanId;
      if (state.openSpans.has(id)) state.openSpans.delete(id);
      else state.openSpans.add(id);
      renderWaterfall(state.trace);
    });
    $("approvals-list").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button && !button.disabled) answer(button);
    });
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("api-key").value.trim();
      if (value) localStorage.setItem(KEY_STORAGE, value);
      else localStorage.removeItem(KEY_STORAGE);
      state.runCosts.clear();
      clearNotices();
      tick();
    });
    $("status-filters").addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) return;
      state.filter = button.dataset.filter;
      state.cursors = [null];
      state.page = 0;
      choose($("status-filters"), "filter", state.filter);
      tick();
    });
    $("workflow-filter").addEventListener("change", (event) => {
      state.workflow = event.target.value.trim();
      state.cursors = [null];
      state.page = 0;
      tick();
    });
    $("runs-older").addEventListener("click", () => {
      if (!state.nextCursor) return;
      state.cursors[state.page + 1] = state.nextCursor;
      state.page += 1;
      tick();
    });
    $("runs-newer").addEventListener("click", () => {
      state.page = Math.max(0, state.page - 1);
      tick();
    });
    $("costs-by").addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) return;
      state.costsBy = button.dataset.by;
      choose($("costs-by"), "by", state.costsBy);
      tick();
    });
    $("costs-range").addEventListener("change", (event) => {
      state.costsRange = event.target.value;
      tick();
    });
    window.addEventListener("hashchange", route);
    route();
  }

  setup();
})();
