// FishChat IoT monitor page: reads the JSON API (docs/monitor.md), live via /api/stream.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { page: 1, perPage: 50, q: "", devState: "", series: [] };

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function ago(ms) {
  if (!ms) return "–";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}
function clock(ms) { return ms ? new Date(ms).toLocaleTimeString() : "–"; }
function when(ms) { return ms ? new Date(ms).toLocaleString() : "–"; }

async function api(path, opts = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...opts });
  if (res.status === 401) { location.href = "/login"; throw new Error("logged out"); }
  const doc = await res.json();
  if (!res.ok) throw new Error(doc.error || res.statusText);
  return doc;
}

function renderStatus(doc) {
  const t = doc.totals || {};
  $("t-sessions").textContent = t.sessions ?? "–";
  $("t-in").textContent = t.msgs_in_per_s ?? "–";
  $("t-out").textContent = t.msgs_out_per_s ?? "–";
  $("t-accepted").textContent = t.msgs_in ?? "–";
  $("t-delivered").textContent = t.msgs_out ?? "–";
  $("t-queued").textContent = t.queued_now ?? "–";
  $("t-refused").textContent = t.refused_logins ?? "–";
}

function renderNodes(nodes) {
  $("nodes").tBodies[0].innerHTML = nodes.map((n) => `<tr data-node="${esc(n.node_id)}">
    <td>${esc(n.node_id)}</td><td>${esc(n.role)}</td><td>${esc(n.address)}</td>
    <td title="${esc(when(n.started_ms))}">${esc(ago(n.started_ms))}</td>
    <td class="n">${n.sessions}</td><td class="n">${n.msgs_in_per_s ?? "–"}</td>
    <td class="n">${n.msgs_out_per_s ?? "–"}</td><td class="n">${n.queued ?? "–"}</td>
    <td class="${n.health === "ok" ? "state-online" : "state-revoked"}">${esc(n.health)}</td></tr>`).join("");
}

async function loadDevices() {
  const p = new URLSearchParams({ page: state.page, per_page: state.perPage, q: state.q, state: state.devState });
  const doc = await api(`/api/devices?${p}`);
  if (state.page > doc.pages) { state.page = doc.pages; return loadDevices(); }
  $("dev-count").textContent = `${doc.total} shown of ${doc.registered} registered, ${doc.online} online`;
  $("dev-page").textContent = `page ${doc.page} of ${doc.pages}`;
  $("dev-prev").disabled = doc.page <= 1;
  $("dev-next").disabled = doc.page >= doc.pages;
  $("devices").tBodies[0].innerHTML = doc.devices.map((d) => `<tr data-device="${esc(d.id)}">
    <td class="dev-id">${esc(d.id)}</td>
    <td class="dev-state state-${d.state}">${d.state}</td>
    <td>${esc(d.address || "–")}</td>
    <td title="${esc(when(d.since_ms))}">${d.online ? esc(clock(d.since_ms)) : "–"}</td>
    <td>${esc(d.transport || "–")}</td>
    <td title="${esc(when(d.last_seen_ms))}">${esc(ago(d.last_seen_ms))}</td>
    <td class="n">${d.queued}</td>
    <td>${d.online ? `<button class="kick" data-id="${esc(d.id)}">kick</button>` : ""}
        ${d.revoked ? "" : `<button class="revoke danger" data-id="${esc(d.id)}">revoke</button>`}</td></tr>`).join("");
}

async function loadTopics() {
  const doc = await api("/api/topics?per_page=50");
  $("topic-count").textContent = `${doc.total}`;
  $("topics").tBodies[0].innerHTML = doc.topics.map((t) => `<tr><td>${esc(t.name)}</td>
    <td>${esc(t.owner || "–")}</td><td class="n">${t.members}</td><td class="n">${t.members_online}</td>
    <td class="n">${t.messages}</td></tr>`).join("");
}

async function loadEvents() {
  const doc = await api("/api/events?limit=30");
  $("errors").innerHTML = doc.errors.map((e) => `<li><time>${esc(clock(e.at_ms))}</time>
    <b>${esc(e.level)}</b> ${esc(e.message)}</li>`).join("") || "<li>none</li>";
  $("refused").innerHTML = doc.refused_logins.map((e) => `<li><time>${esc(clock(e.at_ms))}</time>
    <b>${esc(e.device_id)}</b> ${esc(e.code)} (${esc(e.transport)})</li>`).join("") || "<li>none</li>";
}

async function loadSeries() {
  const since = state.series.length ? state.series[state.series.length - 1][0] : 0;
  const doc = await api(`/api/series?since=${since}`);
  state.series = state.series.concat(doc.points);
  const cut = Date.now() - 3600 * 1000;
  while (state.series.length && state.series[0][0] < cut) state.series.shift();
  drawChart($("chart-rate"), [[1, "#2f6fdf"], [2, "#1fa372"]]);
  drawChart($("chart-sessions"), [[3, "#6a4fc9"]]);
}

function drawChart(canvas, lines) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const pts = state.series, now = Date.now(), t0 = now - 3600 * 1000;
  let max = 1;
  for (const p of pts) for (const [col] of lines) max = Math.max(max, p[col]);
  const pad = 28, x = (t) => pad + ((t - t0) / (now - t0)) * (w - pad - 4), y = (v) => h - 14 - (v / max) * (h - 24);
  g.strokeStyle = "#e1e4ea"; g.fillStyle = "#6b7385"; g.font = "10px system-ui";
  for (const f of [0, 0.5, 1]) {
    g.beginPath(); g.moveTo(pad, y(max * f)); g.lineTo(w, y(max * f)); g.stroke();
    g.fillText(String(+(max * f).toFixed(1)), 2, y(max * f) + 3);
  }
  g.fillText("-60 min", pad, h - 2); g.fillText("now", w - 24, h - 2);
  for (const [col, color] of lines) {
    g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
    pts.forEach((p, i) => (i ? g.lineTo(x(p[0]), y(p[col])) : g.moveTo(x(p[0]), y(p[col]))));
    g.stroke();
  }
}

function confirmAction(text) {
  const dlg = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
    dlg.showModal();
  });
}

async function act(kind, id) {
  const what = kind === "revoke"
    ? `Revoke device ${id}? Its session closes and it can no longer log in.`
    : `Close the session of ${id}? The device may reconnect.`;
  if (!(await confirmAction(what))) return;
  const path = kind === "revoke" ? `/api/devices/${encodeURIComponent(id)}/revoke` : `/api/sessions/${encodeURIComponent(id)}/kick`;
  try {
    await api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
  } catch (e) { alert(`${kind} failed: ${e.message}`); }
  refresh();
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const [nodes] = await Promise.all([api("/api/nodes"), loadDevices(), loadTopics(), loadEvents(), loadSeries()]);
    renderNodes(nodes.nodes);
  } catch (e) { console.warn(e); } finally { busy = false; }
}

function connect() {
  const es = new EventSource("/api/stream");
  es.addEventListener("status", (ev) => {
    $("live").textContent = "live"; $("live").className = "pill ok";
    renderStatus(JSON.parse(ev.data));
    refresh();
  });
  es.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "pill bad"; };
}

let typing;
$("dev-q").addEventListener("input", (e) => {
  clearTimeout(typing);
  typing = setTimeout(() => { state.q = e.target.value.trim(); state.page = 1; loadDevices(); }, 200);
});
$("dev-state").addEventListener("change", (e) => { state.devState = e.target.value; state.page = 1; loadDevices(); });
$("dev-prev").addEventListener("click", () => { state.page = Math.max(1, state.page - 1); loadDevices(); });
$("dev-next").addEventListener("click", () => { state.page += 1; loadDevices(); });
$("devices").addEventListener("click", (e) => {
  const b = e.target.closest("button");
  if (b) act(b.classList.contains("revoke") ? "revoke" : "kick", b.dataset.id);
});
api("/api/whoami").then((d) => { $("who").textContent = d.operator; }).catch(() => {});
api("/api/status").then(renderStatus).catch(() => {});
refresh();
connect();
