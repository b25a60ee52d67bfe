// Velesio mesh dashboard: polls /health and /queue/status every second, and drives a small chat and
// txt2img playground. Plain browser JavaScript, no dependencies. The API token lives in sessionStorage only.
"use strict";

(() => {
  const TOKEN_KEY = "velesio.token";
  const POLL_MS = 1000;
  const $ = (sel) => document.querySelector(sel);

  let pollTimer = null;
  let polling = false;
  let chatHistory = [];
  let chatAbort = null;

  // ---- tiny DOM helper: h("div", {class: "x", dataset: {a: 1}}, "text", child) ----
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key === "text") el.textContent = value;
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // ---- token ----
  const getToken = () => sessionStorage.getItem(TOKEN_KEY);

  function showLogin(message) {
    stopPolling();
    $("#app").hidden = true;
    $("#sign-out").hidden = true;
    $("#login").hidden = false;
    const err = $("#token-error");
    err.textContent = message || "";
    err.hidden = !message;
    setStatus("unknown", "signed out");
    $("#token").focus();
  }

  function showApp() {
    $("#login").hidden = true;
    $("#app").hidden = false;
    $("#sign-out").hidden = false;
    startPolling();
  }

  class AuthError extends Error {}

  async function api(path, options = {}) {
    const token = getToken();
    const headers = { ...(options.headers || {}) };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, { ...options, headers, cache: "no-store" });
    if (response.status === 401) throw new AuthError(await errorMessage(response));
    return response;
  }

  async function errorMessage(response) {
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      const err = body.error || {};
      return err.message || body.detail || text || `HTTP ${response.status}`;
    } catch {
      return text || `HTTP ${response.status} ${response.statusText}`;
    }
  }

  // ---- polling ----
  function startPolling() {
    if (pollTimer !== null || polling) return;
    poll();
  }

  function stopPolling() {
    if (pollTimer !== null) clearTimeout(pollTimer);
    pollTimer = null;
  }

  async function poll() {
    pollTimer = null;
    polling = true;
    try {
      const [health, queue] = await Promise.all([
        api("/health").then((r) => r.json()),
        api("/queue/status").then(async (r) => {
          if (!r.ok) throw new Error(await errorMessage(r));
          return r.json();
        }),
      ]);
      render(health, queue);
      $("#poll-error").hidden = true;
    } catch (exc) {
      polling = false;
      if (exc instanceof AuthError) {
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin("The router refused this token: " + exc.message);
        return;
      }
      setStatus("down", "unreachable");
      const banner = $("#poll-error");
      banner.textContent = `Cannot reach the router (${exc.message}); retrying every second.`;
      banner.hidden = false;
    }
    polling = false;
    if (!$("#app").hidden) pollTimer = setTimeout(poll, POLL_MS);
  }

  function setStatus(status, label) {
    const pill = $("#mesh-status");
    pill.dataset.status = status;
    pill.textContent = label;
  }

  // ---- rendering ----
  const fmtInt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "–");

  function fmtMB(mb) {
    if (typeof mb !== "number") return "–";
    return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GiB` : `${mb} MiB`;
  }

  function fmtAge(s) {
    if (typeof s !== "number") return "–";
    return s < 10 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`;
  }

  function render(health, queue) {
    const workers = (health.workers || []).slice().sort((a, b) => String(a.id).localeCompare(String(b.id)));
    setStatus(health.status === "healthy" ? "healthy" : "degraded", health.status || "unknown");
    $("#version").textContent = health.version ? `v${health.version}` : "";
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;

    $("#stat-workers").textContent = fmtInt(queue.active_workers);
    $("#stat-queued").textContent = fmtInt(queue.queue_depth);
    $("#stat-running").textContent = fmtInt(queue.running_jobs);
    $("#stat-done").textContent = fmtInt(queue.completed_jobs_24h);

    renderWorkers(workers);
    renderQueues(workers, queue.queues || {});
    renderFailures(health.failures || []);
    updateModelSelect($("#chat-model"), workers, "text");
    updateModelSelect($("#img-model"), workers, "image");
  }

  function renderWorkers(workers) {
    const box = $("#workers");
    box.replaceChildren(...workers.map(workerCard));
    box.dataset.count = String(workers.length);
    $("#workers-empty").hidden = workers.length > 0;
  }

  function workerCard(w) {
    const total = w.memory_total_mb;
    const free = w.memory_free_mb;
    const usedPct = typeof total === "number" && total > 0 && typeof free === "number"
      ? Math.min(100, Math.max(0, 100 * (total - free) / total)) : null;
    const bar = h("div", { class: "bar" }, h("div", { class: "bar-fill" }));
    if (usedPct !== null) {
      bar.firstChild.style.width = `${usedPct.toFixed(1)}%`;
      if (usedPct > 90) bar.classList.add("hot");
    }
    const device = w.device || "unknown device";
    const isGpu = /cuda|rocm|mps|gpu/i.test(device);
    const age = w.heartbeat_age_s;
    const failures = w.failures || [];

    return h("article", { class: "worker", dataset: { worker: w.id, status: w.status } },
      h("header", { class: "worker-head" },
        h("span", { class: "dot", dataset: { status: w.status }, title: w.status }),
        h("h3", { class: "worker-name", text: w.id }),
        h("span", { class: "badge", text: w.type || "" }),
        h("span", { class: "worker-status", text: w.status })),
      h("dl", { class: "facts" },
        h("dt", { text: "host" }), h("dd", { class: "host", text: w.host || "–" }),
        h("dt", { text: isGpu ? "GPU" : "device" }), h("dd", { class: "device", text: device, title: device }),
        h("dt", { text: isGpu ? "GPU memory" : "memory" }),
        h("dd", { class: "memory" },
          h("span", { text: usedPct === null ? "–" : `${fmtMB(total - free)} used of ${fmtMB(total)}` }), bar)),
      h("ul", { class: "models" }, (w.models || []).map(modelRow),
        (w.loading || []).map((name) => modelRow({ name, kind: "", slots: 0, free: 0, state: "loading" }))),
      h("div", { class: "counters" },
        counter("in flight", fmtInt(w.jobs_in_flight), "jobs-in-flight"),
        counter("jobs done", fmtInt(w.jobs_done), "jobs-done"),
        counter("heartbeat", fmtAge(age), "heartbeat", typeof age === "number" && age > 1.5 ? "late" : null),
        counter("failures", fmtInt(failures.length), "failures", failures.length ? "bad" : null,
          failures.map((f) => `${f.model || f.backend}: ${f.reason}`).join("\n") || null)));
  }

  function counter(label, value, key, tone, title) {
    return h("div", { class: `counter${tone ? " " + tone : ""}`, dataset: { field: key }, title },
      h("span", { class: "counter-value", text: value }), h("span", { class: "counter-label", text: label }));
  }

  // A model's state, from its worker: ready, or loading / sleeping (idle past its keep_alive: its next job
  // loads it again) / draining (being unloaded) / restarting (after a crash).
  const STATE_TEXT = { loading: "loading", sleeping: "asleep", draining: "unloading", restarting: "restarting",
    failed: "failed", starting: "starting" };

  function modelRow(m) {
    const slots = Number(m.slots) || 0;
    const state = m.state || "ready";
    // Slots of a model that is not ready are not free to take a job, except asleep (a job wakes it).
    const free = Math.max(0, Number(m.free) || 0);
    const busy = state === "ready" || state === "sleeping" ? Math.max(0, slots - free) : 0;
    const dots = [];
    for (let i = 0; i < Math.min(slots, 16); i++) dots.push(h("span", { class: i < busy ? "slot busy" : "slot" }));
    const proc = m.backend_process || {};
    const about = [proc.pid ? `backend process ${proc.pid}` : null,
      typeof proc.memory_mb === "number" ? `${fmtMB(proc.memory_mb)} in use` : null,
      typeof proc.size_mb === "number" ? `about ${fmtMB(proc.size_mb)} by its files` : null,
      typeof proc.keep_alive_s === "number" ? `unloaded after ${proc.keep_alive_s} s idle` : null]
      .filter(Boolean).join(" · ");
    return h("li", { class: "model", dataset: { model: m.name, busy, free, state }, title: about || null },
      h("span", { class: `kind kind-${m.kind || "other"}`, text: m.kind || "?" }),
      h("span", { class: "model-name", text: m.name }),
      state === "ready" ? null : h("span", { class: `model-state state-${state}`, text: STATE_TEXT[state] || state }),
      slots ? h("span", { class: "slots", title: `${busy} busy, ${free} free of ${slots} slot(s)` },
        dots, h("span", { class: "slot-text", text: `${busy}/${slots} busy` })) : null);
  }

  function renderQueues(workers, queues) {
    const models = new Map();
    for (const w of workers) {
      for (const m of w.models || []) {
        const row = models.get(m.name) || { name: m.name, kind: m.kind, workers: 0, slots: 0, free: 0 };
        row.workers += 1;
        row.slots += Number(m.slots) || 0;
        row.free += Number(m.free) || 0;
        models.set(m.name, row);
      }
    }
    for (const name of Object.keys(queues)) {
      if (!models.has(name)) models.set(name, { name, kind: "?", workers: 0, slots: 0, free: 0 });
    }
    const rows = [...models.values()].sort((a, b) => a.name.localeCompare(b.name)).map((m) => {
      const depth = queues[m.name] || 0;
      return h("tr", { dataset: { model: m.name, depth } },
        h("td", { class: "model-name", text: m.name }),
        h("td", {}, h("span", { class: `kind kind-${m.kind || "other"}`, text: m.kind || "?" })),
        h("td", { class: "num", text: m.workers }),
        h("td", { class: "num", text: `${m.slots - m.free} / ${m.slots}` }),
        h("td", { class: `num depth${depth ? " queued" : ""}`, text: depth }));
    });
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: 5, class: "empty", text: "No model is served." })));
    $("#queues tbody").replaceChildren(...rows);
  }

  function renderFailures(failures) {
    const box = $("#failures");
    box.hidden = failures.length === 0;
    box.replaceChildren(...(failures.length ? [h("h3", { text: "Load failures" })] : []),
      ...failures.map((f) => h("p", {},
        h("strong", { text: `${f.worker}` }), ` · ${f.backend || ""} ${f.model || ""}: ${f.reason || ""}`)));
  }

  function updateModelSelect(select, workers, kind) {
    const names = [...new Set(workers.flatMap((w) => (w.models || []).filter((m) => m.kind === kind)
      .map((m) => m.name)))].sort();
    const wanted = ["", ...names].join("\n");
    if (select.dataset.options === wanted) return;
    const current = select.value;
    select.replaceChildren(h("option", { value: "", text: names.length ? "default model" : `no ${kind} model` }),
      ...names.map((n) => h("option", { value: n, text: n })));
    select.dataset.options = wanted;
    if (names.includes(current)) select.value = current;
  }

  // ---- chat playground ----
  function chatBubble(role, text) {
    const bubble = h("div", { class: `msg msg-${role}`, dataset: { role } },
      h("span", { class: "msg-role", text: role === "user" ? "you" : role }),
      h("div", { class: "msg-text", text }));
    const log = $("#chat-output");
    log.append(bubble);
    log.scrollTop = log.scrollHeight;
    return bubble.querySelector(".msg-text");
  }

  async function sendChat(event) {
    event.preventDefault();
    const form = $("#chat-form");
    if (form.dataset.state === "streaming") return;
    const input = $("#chat-input");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    chatBubble("user", text);
    chatHistory.push({ role: "user", content: text });
    const out = chatBubble("assistant", "");
    out.classList.add("streaming");
    const log = $("#chat-output");

    const body = {
      messages: chatHistory,
      stream: true,
      max_tokens: Number($("#chat-max-tokens").value) || 128,
      temperature: Number($("#chat-temperature").value),
    };
    if ($("#chat-model").value) body.model = $("#chat-model").value;

    chatAbort = new AbortController();
    form.dataset.state = "streaming";
    $("#chat-send").disabled = true;
    $("#chat-stop").hidden = false;
    $("#chat-meta").textContent = "waiting for a worker…";
    const started = performance.now();
    let first = null;
    let chunks = 0;
    let finish = null;
    let model = null;
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
        signal: chatAbort.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        buffer += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          let chunk;
          try { chunk = JSON.parse(data); } catch { continue; }
          if (chunk.error) throw new Error(chunk.error.message || "the stream ended with an error");
          const choice = (chunk.choices || [])[0] || {};
          model = chunk.model || model;
          if (choice.finish_reason) finish = choice.finish_reason;
          const piece = (choice.delta || {}).content;
          if (piece) {
            if (first === null) first = performance.now();
            chunks += 1;
            out.textContent += piece;
            log.scrollTop = log.scrollHeight;
            $("#chat-meta").textContent = `${chunks} chunk(s)…`;
          }
        }
      }
      chatHistory.push({ role: "assistant", content: out.textContent });
      const total = (performance.now() - started) / 1000;
      const rate = first !== null && chunks > 1 ? chunks / ((performance.now() - first) / 1000) : null;
      $("#chat-meta").textContent = [model, `${chunks} chunk(s)`, `${total.toFixed(2)} s`,
        rate ? `${rate.toFixed(1)} chunks/s` : null, finish ? `finish: ${finish}` : null]
        .filter(Boolean).join(" · ");
    } catch (exc) {
      chatHistory.pop();
      if (exc instanceof AuthError) {
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin("The router refused this token: " + exc.message);
      }
      const aborted = exc.name === "AbortError";
      out.parentElement.classList.add(aborted ? "stopped" : "failed");
      if (!aborted || !out.textContent) out.textContent += (out.textContent ? "\n" : "") +
        (aborted ? "(stopped)" : `Error: ${exc.message}`);
      $("#chat-meta").textContent = aborted ? "stopped" : "failed";
    } finally {
      out.classList.remove("streaming");
      form.dataset.state = "done";
      $("#chat-send").disabled = false;
      $("#chat-stop").hidden = true;
      chatAbort = null;
    }
  }

  // ---- txt2img playground ----
  async function sendImage(event) {
    event.preventDefault();
    const form = $("#img-form");
    if (form.dataset.state === "running") return;
    const prompt = $("#img-prompt").value.trim();
    const out = $("#img-output");
    const meta = $("#img-meta");
    if (!prompt) { $("#img-prompt").focus(); return; }
    const body = {
      prompt,
      width: Number($("#img-width").value) || 256,
      height: Number($("#img-height").value) || 256,
      steps: Number($("#img-steps").value) || 8,
    };
    if ($("#img-model").value) body.model = $("#img-model").value;
    form.dataset.state = "running";
    $("#img-send").disabled = true;
    out.classList.add("busy");
    meta.textContent = "generating…";
    const started = performance.now();
    try {
      const response = await api("/sdapi/v1/txt2img", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const result = await response.json();
      const images = result.images || [];
      if (!images.length) throw new Error("the router answered with no image");
      let info = {};
      try { info = typeof result.info === "string" ? JSON.parse(result.info) : (result.info || {}); } catch { /* keep {} */ }
      out.replaceChildren(...images.map((b64, i) => {
        const src = b64.startsWith("data:") ? b64 : `data:image/png;base64,${b64}`;
        return h("a", { href: src, download: `velesio-${info.seed ?? "image"}-${i}.png`, title: "Download PNG" },
          h("img", { src, alt: prompt, width: body.width, height: body.height }));
      }));
      const seconds = ((performance.now() - started) / 1000).toFixed(2);
      meta.textContent = [info.sd_model_name, `${body.width}×${body.height}`, `${body.steps} steps`,
        info.seed !== undefined ? `seed ${info.seed}` : null, `${seconds} s`].filter(Boolean).join(" · ");
      form.dataset.state = "done";
    } catch (exc) {
      if (exc instanceof AuthError) {
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin("The router refused this token: " + exc.message);
      }
      out.replaceChildren(h("p", { class: "error", text: `Error: ${exc.message}` }));
      meta.textContent = "failed";
      form.dataset.state = "failed";
    } finally {
      out.classList.remove("busy");
      $("#img-send").disabled = false;
    }
  }

  // ---- wiring ----
  async function submitToken(event) {
    event.preventDefault();
    const token = $("#token").value.trim();
    if (!token) return;
    const button = $("#token-submit");
    button.disabled = true;
    try {
      const response = await fetch("/queue/status", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
      if (response.status === 401 || response.status === 403) {
        showLogin("The router refused this token: " + await errorMessage(response));
        return;
      }
      if (!response.ok) {
        showLogin(`The router answered ${response.status}: ${await errorMessage(response)}`);
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, token);
      $("#token").value = "";
      $("#token-error").hidden = true;
      showApp();
    } catch (exc) {
      showLogin(`Cannot reach the router: ${exc.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function init() {
    $("#token-form").addEventListener("submit", submitToken);
    $("#sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      if (chatAbort) chatAbort.abort();
      showLogin("");
    });
    $("#chat-form").addEventListener("submit", sendChat);
    $("#chat-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("#chat-form").requestSubmit();
      }
    });
    $("#chat-stop").addEventListener("click", () => chatAbort && chatAbort.abort());
    $("#chat-clear").addEventListener("click", () => {
      if (chatAbort) chatAbort.abort();
      chatHistory = [];
      $("#chat-output").replaceChildren();
      $("#chat-meta").textContent = "";
    });
    $("#img-form").addEventListener("submit", sendImage);
    if (getToken()) showApp();
    else openWithoutToken();
  }

  // A router started with --no-auth answers without a token: then there is nothing to ask for.
  async function openWithoutToken() {
    try {
      const response = await fetch("/queue/status", { cache: "no-store" });
      if (response.ok) {
        showApp();
        $("#sign-out").hidden = true;
        return;
      }
    } catch { /* fall through to the form */ }
    showLogin("");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
