// The gateway's web console. Plain DOM, no framework, no build step.
//
// Signing in sends the admin key once to POST /console/session, which sets an
// HttpOnly, SameSite=Strict cookie; the key is not kept anywhere on this side.
// The CSRF token for writes lives in a variable only, read again from
// GET /console/session whenever the page loads.
"use strict";

(() => {
  const POLL_MS = 2000;
  const SPARK_POINTS = 60;
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2858d6", "#e07b39", "#2f9e6e", "#b34fb3", "#c9a227", "#3aa6c9", "#d64560", "#6f7c91"];

  const state = {
    csrf: null,
    poll: null,
    last: null, // the previous /admin/stats reading
    rates: [],
    editing: null, // the name of the key the form edits, or null to create
    spend: null, // the last /v1/spend answer
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function notice(text, ok) {
    const box = $("notice");
    box.textContent = text || "";
    box.hidden = !text;
    box.classList.toggle("ok", Boolean(ok));
  }

  // --- formatting ------------------------------------------------------------

  function usd(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "$0";
    if (Math.abs(v) >= 1) return "$" + v.toFixed(2);
    // Three significant digits, never in exponent notation: per-request costs are millionths.
    const decimals = Math.min(12, Math.ceil(-Math.log10(Math.abs(v))) + 2);
    return "$" + v.toFixed(decimals).replace(/\.?0+$/, "");
  }

  const int = (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US"));
  const ms = (v) => (v === null || v === undefined ? "–" : Math.round(v) + " ms");

  function when(iso) {
    if (!iso) return "never";
    return new Date(iso).toLocaleString();
  }

  function utcDay(date) {
    return date.toISOString().slice(0, 10);
  }

  // --- the API ---------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const err = (body && body.error) || {};
      super(err.message || "HTTP " + status);
      this.status = status;
      this.code = err.code;
    }
  }

  async function api(method, path, body, retried) {
    const headers = { accept: "application/json" };
    if (body !== undefined) headers["content-type"] = "application/json";
    if (method !== "GET" && state.csrf) headers["x-csrf-token"] = state.csrf;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
    const data = await response.json().catch(() => null);
    if (response.ok) return data;
    const error = new ApiError(response.status, data);
    if (error.code === "csrf_failed" && !retried) {
      await readSession();
      return api(method, path, body, true);
    }
    if (response.status === 401 && path !== "/console/session") signedOut("Signed out: " + error.message);
    throw error;
  }

  // --- session ---------------------------------------------------------------

  async function readSession() {
    const session = await api("GET", "/console/session");
    state.csrf = session.signed_in ? session.csrf_token : null;
    return session.signed_in;
  }

  function signedIn() {
    $("sign-in").hidden = true;
    $("app").hidden = false;
    $("live").hidden = false;
    notice("");
    refreshAll();
    if (state.poll === null) state.poll = setInterval(pollStats, POLL_MS);
    pollStats();
  }

  function signedOut(message) {
    state.csrf = null;
    state.last = null;
    state.rates = [];
    if (state.poll !== null) clearInterval(state.poll);
    state.poll = null;
    hideNewKey();
    $("app").hidden = true;
    $("live").hidden = true;
    $("sign-in").hidden = false;
    notice(message || "");
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $("admin-key");
    const adminKey = input.value;
    input.value = "";
    try {
      const answer = await api("POST", "/console/session", { admin_key: adminKey });
      state.csrf = answer.csrf_token;
      signedIn();
    } catch (error) {
      notice("Sign-in failed: " + error.message);
    }
  }

  async function signOut() {
    try {
      await api("DELETE", "/console/session");
    } finally {
      signedOut("Signed out.");
    }
  }

  // --- keys ------------------------------------------------------------------

  const LIMITS = ["rpm", "tpm", "max_concurrent", "budget_usd_per_day", "budget_usd_per_month"];

  function keyStatus(key) {
    if (key.disabled) return "disabled";
    if (key.expires_at && new Date(key.expires_at) <= new Date()) return "expired";
    return "active";
  }

  async function loadKeys() {
    const answer = await api("GET", "/v1/keys");
    const body = $("keys-table").tBodies[0];
    body.replaceChildren();
    for (const key of answer.data) {
      const status = keyStatus(key);
      const actions = el("td");
      if (!key.read_only) {
        actions.append(
          el("button", { type: "button", class: "secondary", "data-action": "edit", onclick: () => editKey(key) }, "Edit"),
          " ",
          revokeButton(key.name),
        );
      } else {
        actions.append(el("span", { class: "hint" }, "config file"));
      }
      const row = el(
        "tr",
        { "data-key": key.name, class: key.read_only ? "readonly" : "" },
        el("td", {}, key.name),
        el("td", {}, key.label || "–"),
        el("td", {}, key.source),
        el("td", { class: "num" }, int(key.rpm)),
        el("td", { class: "num" }, int(key.tpm)),
        el("td", { class: "num" }, int(key.max_concurrent)),
        el("td", { class: "num" }, usd(key.budget_usd_per_day)),
        el("td", { class: "num" }, usd(key.budget_usd_per_month)),
        el("td", {}, key.models ? key.models.join(", ") : "all"),
        el("td", {}, when(key.expires_at)),
        el("td", {}, el("span", { class: "badge " + status }, status)),
        actions,
      );
      body.append(row);
    }
  }

  function revokeButton(name) {
    // Two clicks: the first arms the button, the second revokes.
    const button = el("button", { type: "button", class: "danger", "data-action": "revoke" }, "Revoke");
    button.addEventListener("click", async () => {
      if (!button.classList.contains("armed")) {
        button.classList.add("armed");
        button.textContent = "Confirm revoke";
        return;
      }
      button.disabled = true;
      try {
        await api("DELETE", "/v1/keys/" + encodeURIComponent(name));
        notice("Key " + name + " revoked.", true);
        if (state.editing === name) resetKeyForm();
        await loadKeys();
      } catch (error) {
        button.disabled = false;
        notice("Revoke failed: " + error.message);
      }
    });
    return button;
  }

  function toLocalInput(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  }

  function editKey(key) {
    const form = $("key-form");
    state.editing = key.name;
    form.elements.name.value = key.name;
    form.elements.name.disabled = true;
    for (const field of LIMITS) form.elements[field].value = key[field] === null ? "" : key[field];
    form.elements.models.value = key.models ? key.models.join(", ") : "";
    form.elements.expires_at.value = toLocalInput(key.expires_at);
    form.elements.disabled.checked = Boolean(key.disabled);
    $("key-form-title").textContent = "Edit key " + key.name;
    $("key-submit").textContent = "Save changes";
    $("key-cancel").hidden = false;
    form.scrollIntoView({ block: "nearest" });
  }

  function resetKeyForm() {
    const form = $("key-form");
    form.reset();
    form.elements.name.disabled = false;
    state.editing = null;
    $("key-form-title").textContent = "Create a key";
    $("key-submit").textContent = "Create key";
    $("key-cancel").hidden = true;
  }

  // The form's fields as the API takes them. Creating sends only what is
  // filled in; editing sends every field, an empty one as null (no limit).
  function keyFields(form, editing) {
    const body = {};
    for (const field of LIMITS) {
      const raw = form.elements[field].value.trim();
      if (raw !== "") body[field] = Number(raw);
      else if (editing) body[field] = null;
    }
    const models = form.elements.models.value.split(",").map((m) => m.trim()).filter(Boolean);
    if (models.length) body.models = models;
    else if (editing) body.models = null;
    const expires = form.elements.expires_at.value;
    if (expires) body.expires_at = new Date(expires).toISOString().replace(/\.\d{3}Z$/, "Z");
    else if (editing) body.expires_at = null;
    if (form.elements.disabled.checked || editing) body.disabled = form.elements.disabled.checked;
    return body;
  }

  async function submitKey(event) {
    event.preventDefault();
    const form = $("key-form");
    const editing = state.editing;
    const body = keyFields(form, editing !== null);
    try {
      if (editing !== null) {
        await api("PATCH", "/v1/keys/" + encodeURIComponent(editing), body);
        notice("Key " + editing + " saved.", true);
      } else {
        body.name = form.elements.name.value.trim();
        const answer = await api("POST", "/v1/keys", body);
        showNewKey(answer.data.name, answer.key);
        notice("");
      }
      resetKeyForm();
      await loadKeys();
    } catch (error) {
      notice((editing ? "Saving failed: " : "Creating failed: ") + error.message);
    }
  }

  function showNewKey(name, key) {
    $("new-key-name").textContent = name;
    $("new-key-value").value = key;
    $("copy-key").textContent = "Copy";
    $("new-key").hidden = false;
  }

  function hideNewKey() {
    $("new-key-value").value = "";
    $("new-key-name").textContent = "";
    $("new-key").hidden = true;
  }

  async function copyKey() {
    const input = $("new-key-value");
    try {
      await navigator.clipboard.writeText(input.value);
      $("copy-key").textContent = "Copied";
    } catch (_) {
      // No clipboard permission: select it for the user to copy.
      input.focus();
      input.select();
      $("copy-key").textContent = "Selected: press Ctrl+C";
    }
  }

  // --- spend -----------------------------------------------------------------

  function days(from, to) {
    const out = [];
    const end = new Date(to + "T00:00:00Z");
    for (let d = new Date(from + "T00:00:00Z"); d <= end && out.length < 400; d.setUTCDate(d.getUTCDate() + 1)) {
      out.push(utcDay(d));
    }
    return out;
  }

  function measureOf(row, measure) {
    if (measure === "requests") return row.requests;
    if (measure === "tokens") return row.prompt_tokens + row.completion_tokens;
    return row.cost;
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= v) return m * step;
    return 10 * step;
  }

  function drawChart(answer, measure) {
    const chart = $("spend-chart");
    chart.replaceChildren();
    const legend = $("spend-legend");
    legend.replaceChildren();
    const W = 720, H = 240, left = 64, right = 8, top = 8, bottom = 24;
    const dates = days(answer.from, answer.to);
    const totals = new Map(); // model -> total, for the order of the stack
    const byDay = new Map(); // date -> Map(model -> value)
    for (const row of answer.data) {
      const v = measureOf(row, measure);
      totals.set(row.model, (totals.get(row.model) || 0) + v);
      if (!byDay.has(row.date)) byDay.set(row.date, new Map());
      const cell = byDay.get(row.date);
      cell.set(row.model, (cell.get(row.model) || 0) + v);
    }
    const models = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || a.localeCompare(b));
    const color = new Map(models.map((m, i) => [m, COLORS[i % COLORS.length]]));
    let peak = 0;
    for (const cell of byDay.values()) peak = Math.max(peak, [...cell.values()].reduce((a, b) => a + b, 0));
    const max = niceMax(peak);
    const plotH = H - top - bottom, plotW = W - left - right;
    const y = (v) => top + plotH - (v / max) * plotH;
    const label = (v) => (measure === "cost" ? usd(v) : int(v));
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      chart.append(svg("line", { class: "axis", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
      chart.append(svg("text", { x: left - 4, y: y(v) + 3, "text-anchor": "end" }, label(v)));
    }
    const slot = plotW / Math.max(dates.length, 1);
    const bar = Math.max(1, slot * 0.7);
    const every = Math.ceil(dates.length / 12);
    dates.forEach((date, i) => {
      const x = left + i * slot + (slot - bar) / 2;
      let base = 0;
      const cell = byDay.get(date) || new Map();
      for (const model of models) {
        const v = cell.get(model) || 0;
        if (v <= 0) continue;
        const rect = svg("rect", {
          x: x.toFixed(1),
          y: y(base + v).toFixed(1),
          width: bar.toFixed(1),
          height: Math.max(0.5, y(base) - y(base + v)).toFixed(1),
          fill: color.get(model),
          "data-date": date,
          "data-model": model,
        });
        rect.append(svg("title", {}, date + " · " + model + " · " + label(v)));
        chart.append(rect);
        base += v;
      }
      if (i % every === 0) {
        chart.append(svg("text", { x: (x + bar / 2).toFixed(1), y: H - 8, "text-anchor": "middle" }, date.slice(5)));
      }
    });
    if (!models.length) {
      chart.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "nothing spent in this range"));
    }
    for (const model of models) {
      const swatch = el("span", { class: "swatch" });
      swatch.style.backgroundColor = color.get(model);
      legend.append(el("span", { "data-model": model }, swatch, model));
    }
  }

  function drawSpendTable(answer) {
    const body = $("spend-table").tBodies[0];
    body.replaceChildren();
    const rows = [...answer.data].sort((a, b) => b.date.localeCompare(a.date) || b.cost - a.cost);
    for (const row of rows) {
      body.append(
        el(
          "tr",
          {},
          el("td", {}, row.date),
          el("td", {}, row.model),
          el("td", { class: "num" }, int(row.requests)),
          el("td", { class: "num" }, int(row.prompt_tokens)),
          el("td", { class: "num" }, int(row.completion_tokens)),
          el("td", { class: "num" }, usd(row.cost)),
        ),
      );
    }
    const t = answer.total;
    $("spend-table").tFoot.replaceChildren(
      el(
        "tr",
        {},
        el("td", {}, "total"),
        el("td", {}),
        el("td", { class: "num" }, int(t.requests)),
        el("td", { class: "num" }, int(t.prompt_tokens)),
        el("td", { class: "num" }, int(t.completion_tokens)),
        el("td", { class: "num" }, usd(t.cost)),
      ),
    );
  }

  async function loadSpend() {
    const form = $("spend-form");
    const query = new URLSearchParams({ from: form.elements.from.value, to: form.elements.to.value, group_by: "day,model" });
    state.spend = await api("GET", "/v1/spend?" + query);
    drawChart(state.spend, form.elements.measure.value);
    drawSpendTable(state.spend);
  }

  function spendDefaults() {
    const form = $("spend-form");
    const today = new Date();
    form.elements.to.value = utcDay(today);
    form.elements.from.value = utcDay(new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), 1)));
  }

  // --- recent requests and endpoints ---------------------------------------

  async function loadRequests() {
    const answer = await api("GET", "/admin/requests?limit=50");
    const body = $("requests-table").tBodies[0];
    body.replaceChildren();
    for (const r of answer.data) {
      const failedAttempts = r.attempts.filter((a) => a.outcome.startsWith("failed") || a.outcome === "rejected").length;
      body.append(
        el(
          "tr",
          { "data-id": r.id, class: r.status >= 400 ? "failed" : "" },
          el("td", {}, new Date(r.created_at * 1000).toLocaleTimeString()),
          el("td", { title: r.error || "" }, r.id),
          el("td", {}, r.key),
          el("td", {}, r.api),
          el("td", {}, r.model || r.requested_model || "–"),
          el("td", {}, r.provider || "–"),
          el("td", { class: "num" }, r.status),
          el("td", { class: "num" }, int(r.tokens_prompt) + " / " + int(r.tokens_completion)),
          el("td", { class: "num" }, usd(r.total_cost)),
          el("td", { class: "num" }, ms(r.latency_ms)),
          el("td", { class: "num" }, r.attempts.length + (failedAttempts ? " (" + failedAttempts + " failed)" : "")),
        ),
      );
    }
    if (!answer.data.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: "11" }, "no requests yet")));
  }

  async function loadEndpoints() {
    const answer = await api("GET", "/admin/endpoints");
    const body = $("endpoints-table").tBodies[0];
    body.replaceChildren();
    for (const e of answer.data) {
      const circuit = !e.enabled ? "disabled" : e.circuit;
      body.append(
        el(
          "tr",
          { "data-endpoint": e.endpoint, "data-model": e.model },
          el("td", {}, e.model),
          el("td", {}, e.provider),
          el("td", {}, e.upstream_model),
          el("td", { title: e.disabled_reason || "" }, el("span", { class: "badge " + circuit }, circuit)),
          el("td", { class: "num" }, int(e.requests)),
          el("td", { class: "num" }, int(e.failures)),
          el("td", { class: "num" }, ms(e.latency_ms)),
          el("td", { class: "num" }, e.throughput_tps === null ? "–" : e.throughput_tps.toFixed(1) + " tok/s"),
          el("td", {}, e.last_error || ""),
        ),
      );
    }
  }

  // --- live rates ------------------------------------------------------------

  function drawSpark() {
    const spark = $("live-spark");
    spark.replaceChildren();
    const rates = state.rates;
    if (rates.length < 2) return;
    const peak = Math.max(...rates, 1);
    const points = rates.map((r, i) => {
      const x = (i / (SPARK_POINTS - 1)) * 120;
      return x.toFixed(1) + "," + (23 - (r / peak) * 22).toFixed(1);
    });
    spark.append(svg("polyline", { points: points.join(" ") }));
  }

  async function pollStats() {
    if (document.hidden) return;
    let now;
    try {
      now = await api("GET", "/admin/stats");
    } catch (error) {
      if (error.status !== 401) notice("Stats unavailable: " + error.message);
      return;
    }
    const last = state.last;
    state.last = now;
    $("live-inflight").textContent = int(now.in_flight);
    if (last === null) return;
    const served = now.requests - last.requests;
    const seconds = Math.max(now.at - last.at, 0.001);
    const rps = Math.max(served, 0) / seconds;
    $("live-rps").textContent = rps.toFixed(rps < 10 ? 2 : 0);
    $("live-errors").textContent = served > 0 ? ((100 * (now.server_errors - last.server_errors)) / served).toFixed(1) + " %" : "–";
    $("live-refused").textContent = served > 0 ? ((100 * (now.client_errors - last.client_errors)) / served).toFixed(1) + " %" : "–";
    state.rates.push(rps);
    if (state.rates.length > SPARK_POINTS) state.rates.shift();
    drawSpark();
    // New requests: what they changed is worth showing now.
    if (served > 0) refreshAll(false);
  }

  async function refreshAll(withKeys = true) {
    const loads = [loadSpend(), loadRequests(), loadEndpoints()];
    if (withKeys) loads.push(loadKeys());
    const results = await Promise.allSettled(loads);
    const failed = results.find((r) => r.status === "rejected" && r.reason.status !== 401);
    if (failed) notice("Could not load: " + failed.reason.message);
  }

  // --- start -----------------------------------------------------------------

  async function start() {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", signOut);
    $("key-form").addEventListener("submit", submitKey);
    $("key-cancel").addEventListener("click", resetKeyForm);
    $("copy-key").addEventListener("click", copyKey);
    $("dismiss-key").addEventListener("click", hideNewKey);
    $("spend-form").addEventListener("submit", (event) => {
      event.preventDefault();
      loadSpend().catch((error) => notice("Could not load spend: " + error.message));
    });
    $("spend-form").elements.measure.addEventListener("change", () => {
      if (state.spend) drawChart(state.spend, $("spend-form").elements.measure.value);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.csrf) pollStats();
    });
    spendDefaults();
    try {
      if (await readSession()) signedIn();
      else signedOut();
    } catch (error) {
      signedOut("The console is unavailable: " + error.message);
    }
  }

  document.addEventListener("DOMContentLoaded", start);
})();
