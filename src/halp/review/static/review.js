// halp review: one sample per screen, keyboard first. Every user string goes in with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const page = new URLSearchParams(location.search);
const state = {
  config: null,
  reviewer: "",
  queue: page.get("queue") || "unknown",
  order: page.get("order") || "table",
  where: page.get("where") || "",
  indices: [],
  reviewed: [],
  pos: 0,
  item: null,
  busy: false,
  undo: [], // decision ids made in this tab, latest last
};

function setText(id, text) { $(id).textContent = text == null ? "" : String(text); }

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("the review server does not answer (stopped?): " + err.message);
  }
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch (err) { /* a plain-text refusal */ }
  if (!response.ok) throw new Error((data && data.error) || text || response.statusText);
  return data;
}

function queueParams() {
  const params = new URLSearchParams({ queue: state.queue, order: state.order, reviewer: state.reviewer });
  if (state.where) params.set("where", state.where);
  return params;
}

function queueBody() {
  return { queue: state.queue, order: state.order, where: state.where || null, reviewer: state.reviewer };
}

let toastTimer = null;
function toast(message, kind) {
  const box = $("toast");
  box.textContent = message;
  box.className = "toast" + (kind === "info" ? " info" : "");
  box.hidden = false;
  clearTimeout(toastTimer);
  if (kind === "info") toastTimer = setTimeout(() => { box.hidden = true; }, 2500);
}

function formatDuration(seconds) {
  if (seconds == null) return "";
  if (seconds < 60) return "< 1 min";
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return minutes + " min";
  return Math.floor(minutes / 60) + " h " + String(minutes % 60).padStart(2, "0") + " min";
}

function renderProgress(progress) {
  setText("done", progress.done);
  setText("total", progress.total);
  $("meter").style.width = progress.total ? (100 * progress.done / progress.total).toFixed(1) + "%" : "0";
  let pace = "";
  if (progress.per_minute) {
    pace = progress.per_minute.toFixed(1) + " / min";
    if (progress.eta_seconds != null && progress.done < progress.total) pace += " · ETA " + formatDuration(progress.eta_seconds);
  }
  if (progress.done >= progress.total && progress.total > 0) pace = (pace ? pace + " · " : "") + "queue done";
  setText("pace", pace);
}

function fillSelect(id, options, chosen) {
  const select = $(id);
  select.replaceChildren();
  for (const [value, label] of options) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    if (value === chosen) option.selected = true;
    select.appendChild(option);
  }
}

function badge(element, word) {
  element.textContent = word || "not decided";
  element.className = element.className.split(" ").filter((c) => c === "badge" || c === "big").join(" ");
  if (word) element.classList.add(word === "unknown" ? "none" : word);
}

function showImage(item) {
  const image = $("image");
  const placeholder = $("placeholder");
  $("image-pane").classList.remove("zoomed");
  image.style.width = "";
  if (item.image.status !== "ok") {
    image.hidden = true;
    image.removeAttribute("src");
    placeholder.hidden = false;
    setText("placeholder-title", item.image.status === "missing" ? "Image not found" : "Image refused");
    setText("placeholder-path", item.image.path);
    return;
  }
  placeholder.hidden = true;
  image.hidden = false;
  image.onerror = () => {
    image.hidden = true;
    placeholder.hidden = false;
    setText("placeholder-title", "Image cannot be shown");
    setText("placeholder-path", item.image.path);
  };
  image.onload = () => {
    // Tiny images are blown up to the pane: keep their pixels sharp instead of a blur.
    const pane = $("image-pane");
    pane.classList.toggle("small", image.naturalWidth * 3 < pane.clientWidth && image.naturalHeight * 3 < pane.clientHeight);
  };
  image.src = item.image.url;
  image.alt = "image " + item.image_id;
}

function render(item) {
  state.item = item;
  $("main").hidden = false;
  $("empty").hidden = true;
  setText("pos", state.pos + 1);
  setText("count", state.indices.length);
  setText("qid", item.question_id);
  setText("question", item.question);
  setText("answer", item.answer || "(empty answer)");
  setText("truth", item.ground_truth || "(no ground truth)");
  if (item.label) {
    badge($("label-badge"), item.label.label);
    setText("label-origin", item.label.origin);
    $("label-origin").title = item.label.reason;
  } else {
    badge($("label-badge"), "unknown");
    setText("label-origin", state.config.labels_file ? "(not in labels.csv)" : "(no labels.csv yet: halp label RUN)");
    $("label-origin").title = "";
  }
  $("doubts").hidden = !item.doubts.length;
  setText("doubts", item.doubts.length ? "In doubt: " + item.doubts.join("; ") : "");
  badge($("rule-badge"), item.rule.label);
  setText("rule-reason", item.rule.method + " · " + item.rule.reason);
  const risk = $("risk");
  risk.className = "risk";
  if (item.risk == null) {
    setText("risk", "none");
    const problem = state.config.risk_sources.find((text) => text.startsWith("no probe risk"));
    setText("risk-source", problem || (state.config.risk_sources.length ? "(no score for this row)"
      : "(run halp probe or halp predict to see one)"));
  } else {
    setText("risk", item.risk.toFixed(2));
    risk.classList.add(item.risk >= 0.5 ? "high" : "low");
    setText("risk-source", item.risk_source);
  }
  const meta = $("meta");
  meta.replaceChildren();
  const entries = Object.entries(item.meta);
  entries.push(["answer type", item.rule.answer_type]);
  for (const [key, value] of entries) {
    const chip = document.createElement("span");
    chip.className = "meta-item";
    const name = document.createElement("span");
    name.className = "key";
    name.textContent = key + " ";
    chip.append(name, document.createTextNode(value));
    meta.appendChild(chip);
  }
  const others = $("others");
  others.replaceChildren();
  if (!item.others.length) others.textContent = "no other reviewer yet";
  for (const other of item.others) {
    const chip = document.createElement("span");
    chip.className = "meta-item";
    const name = document.createElement("span");
    name.className = "key";
    name.textContent = other.reviewer + " ";
    const word = document.createElement("span");
    badge(word, other.label);
    word.classList.add("badge");
    chip.append(name, word);
    others.appendChild(chip);
  }
  renderMine(item.mine);
  showImage(item);
  history.replaceState(null, "", "#row=" + item.index);
}

function renderMine(label) {
  badge($("mine"), label);
  for (const button of document.querySelectorAll(".verdict")) {
    button.classList.toggle("chosen", button.dataset.label === label);
  }
}

function saveState(text, kind) {
  const element = $("save-state");
  element.textContent = text;
  element.className = "save-state" + (kind ? " " + kind : "");
}

function prefetch(pos) {
  if (pos < state.indices.length) {
    const image = new Image();
    image.src = "image/" + state.indices[pos];
  }
}

async function show(pos) {
  if (!state.indices.length) {
    state.item = null;
    $("main").hidden = true;
    $("empty").hidden = false;
    return;
  }
  state.pos = Math.max(0, Math.min(pos, state.indices.length - 1));
  const reviewer = new URLSearchParams({ reviewer: state.reviewer });
  render(await api("api/item/" + state.indices[state.pos] + "?" + reviewer));
  prefetch(state.pos + 1);
}

async function loadQueue(preferIndex) {
  const params = queueParams();
  history.replaceState(null, "", "?" + params + location.hash);
  const data = await api("api/queue?" + params);
  state.indices = data.indices;
  state.reviewed = data.reviewed;
  renderProgress(data.progress);
  let pos = preferIndex == null ? -1 : state.indices.indexOf(preferIndex);
  if (pos < 0) pos = state.reviewed.indexOf(false);
  if (pos < 0) pos = 0;
  await show(pos);
}

async function run(task) {
  // One action at a time: a key pressed while a save is in flight would act on a row not yet shown.
  if (state.busy) return;
  state.busy = true;
  try {
    await task();
  } catch (err) {
    toast(err.message);
    saveState("not saved", "error");
  } finally {
    state.busy = false;
  }
}

async function decide(label) {
  if (!state.item) return;
  const item = state.item;
  saveState("saving…");
  const data = await api("api/decide", { ...queueBody(), index: item.index, label });
  state.undo.push(data.decision.id);
  const pos = state.indices.indexOf(item.index);
  if (pos >= 0) state.reviewed[pos] = true;
  renderProgress(data.progress);
  renderMine(label);
  $("toast").hidden = true;
  if (state.pos + 1 < state.indices.length) await show(state.pos + 1);
  saveState("✓ " + item.question_id + " saved: " + label, "saved");
  if (state.pos + 1 >= state.indices.length && state.item.index === item.index) {
    toast("End of the queue: " + data.progress.done + " of " + data.progress.total + " decided.", "info");
  }
}

async function undo() {
  const id = state.undo.pop();
  if (id === undefined) {
    toast("Nothing to undo in this tab.", "info");
    return;
  }
  try {
    const data = await api("api/undo", { ...queueBody(), decision_id: id });
    renderProgress(data.progress);
    const pos = state.indices.indexOf(data.index);
    if (pos >= 0) {
      state.reviewed[pos] = data.decision.label !== null;
      await show(pos);
    }
    toast("Undone: " + data.decision.question_id + " is now " + (data.decision.label || "not decided") + ".", "info");
  } catch (err) {
    state.undo.push(id);
    throw err;
  }
}

function nextOpen() {
  for (let step = 1; step <= state.indices.length; step++) {
    const pos = (state.pos + step) % state.indices.length;
    if (!state.reviewed[pos]) return show(pos);
  }
  toast("Every row of this queue has your decision.", "info");
  return Promise.resolve();
}

function toggleHelp(show) {
  const help = $("help");
  help.hidden = show === undefined ? !help.hidden : !show;
}

function toggleZoom(event) {
  if (!state.item || state.item.image.status !== "ok") return;
  const pane = $("image-pane");
  const image = $("image");
  if (pane.classList.contains("zoomed")) {
    pane.classList.remove("zoomed");
    image.style.width = "";
    return;
  }
  // Full size, or twice the pane's width for images smaller than that; centred on the click.
  const box = pane.getBoundingClientRect();
  const fx = event && event.clientX ? (event.clientX - box.left) / box.width : 0.5;
  const fy = event && event.clientY ? (event.clientY - box.top) / box.height : 0.5;
  pane.classList.add("zoomed");
  image.style.width = Math.max(image.naturalWidth, 2 * box.width) + "px";
  pane.scrollLeft = fx * image.clientWidth - box.width / 2;
  pane.scrollTop = fy * image.clientHeight - box.height / 2;
}

const KEYS = { h: "hallucinated", c: "correct", u: "unsure" };

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target && (target.tagName === "SELECT" || target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  if (key === "?" || (key === "Escape" && !$("help").hidden)) {
    event.preventDefault();
    toggleHelp(key === "Escape" ? false : undefined);
    return;
  }
  if (!$("help").hidden) return;
  if (key in KEYS) { event.preventDefault(); run(() => decide(KEYS[key])); }
  else if (key === "ArrowRight") { event.preventDefault(); run(() => show(state.pos + 1)); }
  else if (key === "ArrowLeft") { event.preventDefault(); run(() => show(state.pos - 1)); }
  else if (key === "z") { event.preventDefault(); run(undo); }
  else if (key === "n") { event.preventDefault(); run(nextOpen); }
  else if (key === "f") { event.preventDefault(); toggleZoom(null); }
  else if (key === "Escape") { $("toast").hidden = true; }
});

async function start() {
  try {
    state.config = await api("api/config");
  } catch (err) {
    toast(err.message);
    return;
  }
  const config = state.config;
  state.reviewer = page.get("reviewer") || config.reviewer;
  setText("run", config.run + " · " + config.rows + " rows");
  setText("reviewer", state.reviewer);
  setText("help-file", config.reviews_file);
  fillSelect("queue", Object.keys(config.queues).map((k) => [k, k]), state.queue);
  $("queue").title = Object.entries(config.queues).map(([k, v]) => k + ": " + v).join("\n");
  fillSelect("order", Object.entries(config.orders), state.order);
  const filters = [["", "all rows"]];
  for (const [column, values] of Object.entries(config.filters)) {
    for (const value of values) filters.push([column + "=" + value, column + " = " + value]);
  }
  fillSelect("where", filters, state.where);
  for (const id of ["queue", "order", "where"]) {
    $(id).addEventListener("change", (event) => {
      state[id] = event.target.value;
      event.target.blur();
      run(() => loadQueue(state.item ? state.item.index : null));
    });
  }
  for (const button of document.querySelectorAll(".verdict")) {
    button.addEventListener("click", () => { button.blur(); run(() => decide(button.dataset.label)); });
  }
  $("help-button").addEventListener("click", (event) => { event.target.blur(); toggleHelp(); });
  $("help").addEventListener("click", (event) => { if (event.target === $("help")) toggleHelp(false); });
  $("image-pane").addEventListener("click", toggleZoom);
  const match = /row=(\d+)/.exec(location.hash);
  await run(() => loadQueue(match ? Number(match[1]) : null));
}

start();
