// The inspection page: send an image to /v1/predict, draw every task's result, keep the task
// table and counters fresh. Plain JS, no external files: it works offline on the line PC.
"use strict";

// petah.device.decode.PALETTE: the colours the mask PNG uses for class 0, 1, 2, …
const PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]];
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("petah-token") || "";
let current = null; // {name, bitmap}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, {headers}));
  let body = null;
  try { body = await response.json(); } catch (e) { body = {error: response.statusText}; }
  if (response.status === 401) $("token-box").hidden = false;
  if (!response.ok) throw new Error((body && body.error) || ("HTTP " + response.status));
  return body;
}

function showError(message) { $("error").textContent = message || ""; }

// --- input: file, drop, webcam -------------------------------------------------------------------
async function useBlob(blob, name) {
  showError("");
  let bitmap;
  try { bitmap = await createImageBitmap(blob); } catch (e) { bitmap = null; } // the server names bad files
  current = {name, bitmap};
  const canvas = $("preview");
  if (bitmap) {
    canvas.width = bitmap.width; canvas.height = bitmap.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
  }
  $("image-name").textContent = name + (bitmap ? ` (${bitmap.width}×${bitmap.height})` : "");
  await predict(blob, name);
}

async function predict(blob, name) {
  const form = new FormData();
  form.append("image", blob, name);
  $("status").textContent = "running…";
  try {
    const result = await api("v1/predict", {method: "POST", body: form});
    $("status").textContent = "";
    $("latency").textContent = `server ${result.latency_ms.toFixed(1)} ms · batch of ${result.batch_images}`;
    renderResults(result.images[0]);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  } finally {
    refreshStats();
  }
}

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) useBlob(file, file.name);
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) useBlob(file, file.name);
});

// the webcam needs a secure context (https, or http on localhost)
if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.isSecureContext) {
  $("camera").hidden = false;
} else {
  $("camera-note").textContent = "Webcam: this browser allows it only over HTTPS (or on localhost).";
}
$("camera").addEventListener("click", async () => {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({video: true});
    $("video").srcObject = stream;
    $("video").hidden = false;
    $("snap").hidden = false;
  } catch (e) {
    showError("webcam: " + e.message);
  }
});
$("snap").addEventListener("click", () => {
  const video = $("video");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => useBlob(blob, "snapshot.png"), "image/png");
});
$("token-save").addEventListener("click", () => {
  token = $("token").value.trim();
  sessionStorage.setItem("petah-token", token);
  $("token-box").hidden = true;
  refreshTasks(); refreshStats();
});

// --- results -----------------------------------------------------------------------------------
function bar(label, score, attrs = {}) {
  const percent = Math.max(0, Math.min(100, 100 * score));
  return el("div", Object.assign({class: "bar"}, attrs),
    el("span", {class: "label", text: label, title: label}),
    el("span", {class: "track"}, el("span", {class: "fill", style: `display:block;width:${percent}%`})),
    el("span", {class: "value", text: percent.toFixed(1) + "%"}));
}

function imageCanvas() {
  const canvas = el("canvas");
  if (current && current.bitmap) {
    canvas.width = current.bitmap.width; canvas.height = current.bitmap.height;
    canvas.getContext("2d").drawImage(current.bitmap, 0, 0);
  }
  return canvas;
}

// A PNG the station sent (base64), scaled over the image's canvas; recolor(d, i) sets pixel i's RGBA.
async function drawOverlay(canvas, base64, recolor) {
  const picture = await createImageBitmap(await (await fetch("data:image/png;base64," + base64)).blob());
  const layer = el("canvas");
  layer.width = canvas.width || picture.width; layer.height = canvas.height || picture.height;
  const ctx = layer.getContext("2d");
  ctx.drawImage(picture, 0, 0, layer.width, layer.height);
  const pixels = ctx.getImageData(0, 0, layer.width, layer.height);
  for (let i = 0; i < pixels.data.length; i += 4) recolor(pixels.data, i);
  ctx.putImageData(pixels, 0, 0);
  if (!canvas.width) { canvas.width = layer.width; canvas.height = layer.height; }
  canvas.getContext("2d").drawImage(layer, 0, 0);
}

function drawMask(canvas, base64) { // background (class 0, black) stays clear
  return drawOverlay(canvas, base64, (d, i) => { d[i + 3] = (d[i] || d[i + 1] || d[i + 2]) ? 140 : 0; });
}

// The anomaly map is grey: 128 at the task's threshold, 255 at twice it. Red shows where it passes
// the threshold, stronger towards twice it (as petah predict's heatmap PNG).
function drawHeatmap(canvas, base64) {
  return drawOverlay(canvas, base64, (d, i) => {
    const above = Math.max(0, Math.min(1, (d[i] - 128) / 127));
    d[i] = 230; d[i + 1] = 25; d[i + 2] = 75; d[i + 3] = Math.round(170 * above);
  });
}

function drawBoxes(canvas, boxes) {
  const ctx = canvas.getContext("2d");
  const line = Math.max(1, Math.round(Math.min(canvas.width, canvas.height) / 80));
  ctx.lineWidth = line;
  ctx.font = `${Math.max(9, 4 * line + 6)}px system-ui`;
  for (const found of boxes) {
    const [x0, y0, x1, y1] = found.box;
    ctx.strokeStyle = "rgb(255,40,40)";
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.fillStyle = "rgb(255,230,0)";
    ctx.fillText(`${found.label} ${found.score.toFixed(2)}`, x0 + 1, Math.max(10, y0 - 2));
  }
}

function renderResults(image) {
  const cards = $("results");
  cards.replaceChildren();
  for (const [name, result] of Object.entries(image.tasks)) {
    const card = el("article", {class: "card", "data-task": name, "data-kind": result.kind,
      "data-version": result.version},
      el("h3", {}, el("span", {text: name}), el("span", {class: "version", text: result.version})));
    if (result.kind === "classification") {
      card.setAttribute("data-top-label", result.label);
      for (const entry of result.top) card.append(bar(entry.label, entry.score, {"data-label": entry.label}));
    } else if (result.kind === "segmentation") {
      const canvas = imageCanvas();
      card.append(canvas);
      drawMask(canvas, result.mask_png).catch((e) => showError("mask: " + e.message));
      const shares = Object.entries(result.pixels).sort((a, b) => b[1] - a[1]);
      const labels = (tasksByName[name] || {}).labels || [];
      for (const [cls, share] of shares) {
        const rgb = PALETTE[labels.indexOf(cls)] || [0, 0, 0];
        const row = bar(cls, share, {"data-class": cls, "data-share": String(share)});
        row.firstChild.prepend(el("span", {class: "swatch", style: `background:rgb(${rgb.join(",")})`}));
        card.append(row);
      }
    } else if (result.kind === "anomaly") {
      card.setAttribute("data-anomalous", String(result.anomalous));
      card.setAttribute("data-score", String(result.score));
      const canvas = imageCanvas();
      card.append(canvas);
      drawHeatmap(canvas, result.anomaly_map_png).catch((e) => showError("anomaly map: " + e.message));
      card.append(el("p", {class: result.anomalous ? "verdict bad" : "verdict good",
        text: `${result.anomalous ? "anomaly" : "good"}: score ${result.score.toFixed(3)} ` +
          `(threshold ${result.threshold.toFixed(3)})`}));
    } else if (result.kind === "detection") {
      card.setAttribute("data-box-count", String(result.boxes.length));
      const canvas = imageCanvas();
      card.append(canvas);
      drawBoxes(canvas, result.boxes);
      card.append(el("p", {class: "small", text: `${result.boxes.length} box(es)` +
        (result.boxes.length ? ": " + result.boxes.slice(0, 6).map((b) => `${b.label} ${b.score.toFixed(2)}`)
          .join(", ") : "")}));
    }
    cards.append(card);
  }
  if (!cards.children.length) cards.append(el("p", {class: "muted", text: "No task answered."}));
}

// --- tasks and counters --------------------------------------------------------------------------
let tasksByName = {};

async function refreshTasks() {
  try {
    const body = await api("v1/tasks");
    tasksByName = Object.fromEntries(body.tasks.map((t) => [t.name, t]));
    const rows = body.tasks.map((t) => el("tr", {"data-task": t.name},
      el("td", {text: t.name}), el("td", {text: t.kind}), el("td", {class: "mono", text: t.version}),
      el("td", {class: "mono", text: t.previous_version || "–"}), el("td", {text: t.bytes.toLocaleString()}),
      el("td", {text: String(t.labels.length)}), el("td", {text: t.loaded_at}), driftCell(t.drift || {})));
    $("tasks").tBodies[0].replaceChildren(...rows);
  } catch (e) {
    showError(e.message);
  }
}

// A task's drift state (petah.serve.drift): a word anyone can read, the scores on hover, and a small
// trend of the estimated metric (or the input drift where the kind has no estimate).
function driftCell(drift) {
  const state = drift.state || "off";
  const words = {ok: "ok", drifting: "drifting", "warming up": "watching…", "no reference": "not watched",
                 off: "off"};
  const cell = el("td", {class: "drift", "data-drift": state});
  const badge = el("span", {class: "badge " + state.replace(" ", "-"), text: words[state] || state});
  const parts = [];
  if (drift.estimated !== undefined) parts.push(`estimated ${drift.reference.metric} ${drift.estimated} ` +
    `(at adapt time ${drift.reference.value})` + (drift.estimate_reliable === false ?
    " — not reliable while the inputs drift" : ""));
  if (drift.input_drift !== undefined) parts.push(`input drift ${drift.input_drift}`);
  if (drift.feature_drift !== undefined) parts.push(`feature drift ${drift.feature_drift}`);
  if (drift.why) parts.push(drift.why);
  badge.title = parts.join(" · ");
  cell.append(badge);
  const trend = (drift.trend || []).map((p) => p.estimated ?? p.input_drift).filter((v) => v !== undefined);
  if (trend.length > 1) cell.append(sparkline(trend, drift.estimated !== undefined ? 100 : null));
  if (drift.estimated !== undefined) cell.append(el("span", {class: "muted small", text: ` ${drift.estimated}`}));
  return cell;
}

function sparkline(values, top) {
  const width = 90, height = 22, max = top ?? Math.max(...values, 1e-6), min = top ? 0 : 0;
  const points = values.map((v, i) => `${(i / (values.length - 1)) * width},` +
    `${height - ((v - min) / (max - min || 1)) * height}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height); svg.setAttribute("class", "trend");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  svg.append(line);
  return svg;
}

async function refreshStats() {
  try {
    const s = await api("v1/stats");
    $("c-requests").textContent = s.requests;
    $("c-errors").textContent = s.errors;
    $("c-p50").textContent = s.p50_ms ?? "–";
    $("c-p99").textContent = s.p99_ms ?? "–";
    $("c-queue").textContent = s.queue_depth;
    $("backbone").textContent = `${s.backbone} · engine ${s.engine}`;
  } catch (e) { /* the task table shows the error */ }
}

// --- captured images: review by people who know the parts, not the model ----------------------------
const shownCaptures = new Map(); // id -> card

async function refreshCaptures() {
  let body;
  try { body = await api("v1/captures?limit=20"); } catch (e) { $("captures-box").hidden = true; return; }
  $("captures-box").hidden = false;
  $("captures-count").textContent = `${body.total} kept · ${(body.bytes / 1048576).toFixed(1)} of ` +
    `${(body.max_bytes / 1048576).toFixed(0)} MB` + (body.dropped ? ` · ${body.dropped} dropped (full)` : "");
  const cards = [];
  for (const capture of body.captures) {
    let card = shownCaptures.get(capture.id);
    if (!card) {
      card = captureCard(capture);
      shownCaptures.set(capture.id, card);
    }
    cards.push(card);
  }
  $("captures").replaceChildren(...cards);
}

function captureCard(capture) {
  const card = el("div", {class: "card capture", "data-capture": capture.id});
  const picture = el("img", {alt: capture.source, class: "captured"});
  fetch(`v1/captures/${capture.id}/image`, {headers: token ? {Authorization: "Bearer " + token} : {}})
    .then((r) => r.blob()).then((b) => { picture.src = URL.createObjectURL(b); });
  card.append(el("h3", {text: capture.source}), picture,
              el("div", {class: "muted small", text: "kept: " + capture.reasons.join(", ")}));
  for (const [task, answer] of Object.entries(capture.tasks)) card.append(reviewRow(capture.id, task, answer));
  return card;
}

function reviewRow(id, task, answer) {
  const row = el("div", {class: "review", "data-task": task});
  const done = el("span", {class: "reviewed small"});
  const show = (review) => {
    row.dataset.reviewed = review ? "yes" : "no";
    done.textContent = !review ? "" : ("label" in review ? `✓ ${review.label}` : (review.keep ? "✓ kept" : "✗ discarded"));
  };
  const send = async (body) => {
    try {
      const view = await api(`v1/captures/${id}/review`, {method: "POST", headers: {"Content-Type": "application/json"},
                                                          body: JSON.stringify(Object.assign({task}, body))});
      show(view.tasks[task].review);
    } catch (e) { showError(e.message); }
  };
  row.append(el("strong", {text: task + " "}));
  if (answer.kind === "classification") {
    const choice = el("select", {"aria-label": `right class for ${task}`});
    for (const label of answer.labels) {
      const option = el("option", {value: label, text: label});
      if (label === ((answer.review && answer.review.label) || answer.label)) option.selected = true;
      choice.append(option);
    }
    const confirm = el("button", {class: "button", type: "button", text: "confirm"});
    confirm.addEventListener("click", () => send({label: choice.value}));
    row.append(el("span", {class: "small", text: `said ${answer.label} (${answer.score}) `}), choice, confirm);
  } else {
    const said = answer.kind === "detection" ? `${(answer.boxes || []).length} box(es)` :
      answer.kind === "anomaly" ? (answer.anomalous ? "defect" : "good") : "mask";
    const keep = el("button", {class: "button", type: "button", text: "keep"});
    const discard = el("button", {class: "button", type: "button", text: "discard"});
    keep.addEventListener("click", () => send({keep: true}));
    discard.addEventListener("click", () => send({keep: false}));
    row.append(el("span", {class: "small", text: `said ${said} `}), keep, discard);
  }
  row.append(done);
  show(answer.review);
  return row;
}

// --- the line: each source's newest answered frame with its answers drawn, and the sinks ----------
const sourceCards = new Map(); // name -> {card, canvas, text, frame}
let lineBusy = false; // a slow round must not overlap the next

async function refreshLine() {
  if (lineBusy) return;
  lineBusy = true;
  try { await lineRound(); } finally { lineBusy = false; }
}

async function lineRound() {
  let sources, sinks;
  try {
    [sources, sinks] = [(await api("v1/sources")).sources, (await api("v1/sinks")).sinks];
  } catch (e) { return; }
  $("line-box").hidden = !sources.length && !sinks.length;
  const cards = [];
  for (const source of sources) {
    let shown = sourceCards.get(source.name);
    if (!shown) {
      shown = {canvas: el("canvas"), text: el("p", {class: "small"}), answers: el("div", {class: "small"}), frame: null};
      shown.card = el("article", {class: "card", "data-source": source.name},
        el("h3", {}, el("span", {text: source.name}), el("span", {class: "muted small", text: source.uri})),
        shown.canvas, shown.answers, shown.text);
      sourceCards.set(source.name, shown);
    }
    const up = ["streaming", "watching"].includes(source.state);
    shown.card.dataset.state = source.state;
    const counts = source.trigger ?
      `${source.trigger.triggers} triggers · ${source.taken} answered · ${source.trigger.no_frame} without a frame` +
      (source.trigger.error ? ` · trigger: ${source.trigger.error}` : "") :
      source.kind === "stream" ?
      `${source.taken} answered · ${source.dropped} stale frames skipped · ${source.reconnects} reconnects` :
      `${source.answered} answered · ${source.failed} failed · ${source.waiting} waiting`;
    const latency = source.latency_ms.p99 !== null ? ` · p99 ${source.latency_ms.p99} ms from frame to answer` : "";
    shown.text.replaceChildren(el("span", {class: "badge " + (up ? "ok" : "drifting"), text: source.state}),
      el("span", {text: " " + counts + latency}),
      source.error ? el("span", {class: "error", text: " · " + source.error}) : "");
    cards.push(shown.card);
    try {
      const latest = await api(`v1/sources/${encodeURIComponent(source.name)}/latest`);
      if (latest.frame !== shown.frame) {
        shown.frame = latest.frame;
        await drawLatest(shown, latest);
      }
    } catch (e) { /* nothing answered yet */ }
  }
  $("sources").replaceChildren(...cards);
  $("sinks").tBodies[0].replaceChildren(...sinks.map((s) => el("tr", {"data-sink": s.name, "data-state": s.state},
    el("td", {text: `${s.name} (${s.uri})`}), el("td", {}, el("span", {class: "badge " +
      (s.state === "retrying" ? "drifting" : "ok"), text: s.state})),
    el("td", {text: String(s.delivered)}), el("td", {text: `${(s.backlog_bytes / 1024).toFixed(1)} KB`}),
    el("td", {text: String(s.dropped)}), el("td", {class: "error", text: s.error || ""}))));
}

// Each region's answers are drawn on a canvas of the region's own size, then laid back over the
// frame (a whole-frame answer is one region covering the frame), so boxes and masks keep their
// coordinates.
async function drawLatest(shown, latest) {
  const picture = await createImageBitmap(await (await fetch("data:image/jpeg;base64," + latest.jpeg)).blob());
  const canvas = shown.canvas;
  canvas.width = picture.width; canvas.height = picture.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(picture, 0, 0);
  const words = [];
  for (const region of latest.regions) {
    const [x, y, w, h] = region.box;
    const sub = document.createElement("canvas");
    sub.width = w; sub.height = h;
    sub.getContext("2d").drawImage(canvas, x, y, w, h, 0, 0, w, h);
    const said = [];
    for (const [name, result] of Object.entries(region.tasks)) {
      if (result.kind === "detection") drawBoxes(sub, result.boxes);
      else if (result.kind === "segmentation") await drawMask(sub, result.mask_png);
      else if (result.kind === "anomaly") await drawHeatmap(sub, result.anomaly_map_png);
      said.push(result.kind === "classification" ? `${name}: ${result.label} (${(100 * result.score).toFixed(0)}%)` :
        result.kind === "anomaly" ? `${name}: ${result.anomalous ? "anomaly" : "good"}` :
        result.kind === "detection" ? `${name}: ${result.boxes.length} box(es)` : `${name}: mask`);
    }
    ctx.drawImage(sub, x, y);
    if (region.name !== null) {
      ctx.strokeStyle = "rgb(60,140,255)"; ctx.lineWidth = 1; ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
      ctx.fillStyle = "rgb(60,140,255)"; ctx.font = "10px system-ui"; ctx.fillText(region.name, x + 2, y + 10);
      words.push(`[${region.name}] ` + said.join(" · "));
    } else {
      words.push(...said);
    }
  }
  shown.answers.textContent = `frame ${latest.frame}: ` + words.join(" · ");
  shown.answers.dataset.frame = String(latest.frame);
}

refreshTasks();
refreshStats();
refreshCaptures();
refreshLine();
setInterval(refreshLine, 1000);
setInterval(refreshCaptures, 5000);
setInterval(refreshStats, 2000);
setInterval(refreshTasks, 5000);
