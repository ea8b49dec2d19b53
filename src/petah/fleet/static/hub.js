// The hub's page: releases with their stage and counts, why stations refused them, the stations
// and what they run, and the operator's pause / resume / roll back. Plain JS, no external files.
"use strict";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("petah-hub-token") || "";
const ACTIONS = {rolling: ["pause", "halt"], paused: ["resume", "halt"], halted: ["resume"], complete: ["halt"]};
const LABELS = {pause: "Pause", resume: "Resume", halt: "Roll back"};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const headers = token ? {Authorization: "Bearer " + token} : {};
  const response = await fetch(path, Object.assign({}, options, {headers}));
  let body;
  try { body = await response.json(); } catch (e) { body = {error: response.statusText}; }
  if (response.status === 401) $("token-box").hidden = false;
  if (!response.ok) throw new Error((body && body.error) || ("HTTP " + response.status));
  return body;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function releaseRows(release) {
  const c = release.counts;
  const buttons = (ACTIONS[release.state] || []).map((action) => {
    const button = el("button", {type: "button", class: "button" + (action === "halt" ? " danger" : ""),
      "data-action": action, "data-release": String(release.id), text: LABELS[action]});
    button.addEventListener("click", () => operate(release.id, action));
    return button;
  });
  const stage = release.state === "complete" ? "100 %" :
    `${release.percent} % (stage ${release.stage + 1} of ${release.stages.length})`;
  const row = el("tr", {"data-release": String(release.id), "data-state": release.state},
    el("td", {text: String(release.id)}), el("td", {text: release.kind === "backbone" ?
      `backbone ${release.backbone.slice(0, 8)} → ${release.to_backbone.slice(0, 8)} with ` +
      Object.keys(release.members).sort().join(", ") : release.task}),
    el("td", {class: "version", text: release.version}),
    el("td", {}, el("span", {class: "badge " + release.state, text: release.state})), el("td", {text: stage}),
    el("td", {text: String(c.devices)}), el("td", {text: String(c.promoted)}),
    el("td", {text: `${c.failed} (${c.failed_total})`}),
    el("td", {text: `${release.transfer.devices} · ${(release.transfer.bytes / 1024).toFixed(0)} KB`}),
    el("td", {}, ...buttons));
  const rows = [row];
  if (release.history.length) {
    const steps = release.history.map((h) => `${new Date(h.at * 1000).toLocaleTimeString()} ` +
      `${h.state === "rolling" ? "stage " + (h.stage + 1) : h.state} (${h.by})`);
    rows.push(el("tr", {"data-history": String(release.id)},
      el("td", {}), el("td", {class: "muted small", colspan: "9", text: "history: " + steps.join(" · ")})));
  }
  if (release.failures.length) {
    const list = release.failures.map((f) => `${f.device}: ${f.event}${f.detail ? " (" + f.detail + ")" : ""}`);
    rows.push(el("tr", {"data-failures": String(release.id)},
      el("td", {}), el("td", {class: "failures", colspan: "9", text: "why: " + list.join(" · ")})));
  }
  return rows;
}

function stationRow(device) {
  const versions = Object.entries(device.installed).map(([task, sha]) => `${task}=${sha.slice(0, 12)}`);
  const drifting = Object.entries(device.drift).filter(([, d]) => d.state === "drifting");
  const health = device.state || "unknown";
  return el("tr", {"data-station": device.id},
    el("td", {text: device.id}), el("td", {class: "version", text: (device.backbone || "–").slice(0, 16)}),
    el("td", {class: "version", text: versions.join(", ") || "–"}), el("td", {text: ago(device.last_seen)}),
    el("td", {}, el("span", {class: "badge " + (health === "ok" ? "ok" : "bad"), text: health})),
    el("td", {}, drifting.length ? el("span", {class: "badge drifting", text: "drifting: " + drifting.map(
      ([task, d]) => task + (d.estimated !== undefined ? ` (est. ${Number(d.estimated).toFixed(1)})` : "")).join(", ")})
      : el("span", {class: "muted", text: "–"})));
}

async function refresh() {
  let status;
  try {
    status = await api("v1/releases");
  } catch (e) {
    $("error").textContent = e.message;
    return;
  }
  $("error").textContent = "";
  const releases = [...status.releases].reverse(); // newest first
  $("releases").tBodies[0].replaceChildren(...releases.flatMap(releaseRows));
  $("stations").tBodies[0].replaceChildren(...status.devices.map(stationRow));
  $("c-releases").textContent = String(status.releases.length);
  $("c-rolling").textContent = String(status.releases.filter((r) => r.state === "rolling").length);
  $("c-stations").textContent = String(status.devices.length);
  $("c-drifting").textContent = String(new Set(Object.values(status.drifting).flat()).size);
}

async function operate(id, action) {
  try {
    await api(`v1/releases/${id}/${action}`, {method: "POST"});
    $("error").textContent = "";
  } catch (e) {
    $("error").textContent = `release ${id}: ${e.message}`;
  }
  await refresh();
}

$("token-save").addEventListener("click", () => {
  token = $("token").value.trim();
  sessionStorage.setItem("petah-hub-token", token);
  $("token-box").hidden = true;
  refresh();
});

refresh();
setInterval(refresh, 2000);
