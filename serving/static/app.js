// Demo page for the REST API: search titles, build a history, POST /rec/recall, show the list.
"use strict";

const $ = (id) => document.getElementById(id);
const picked = [];          // [{item_id, title}], oldest first
let searchTimer = null;
let searchSeq = 0;
let recallSeq = 0;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const detail = data && data.detail ? data.detail : resp.statusText;
    throw new Error(`${resp.status}: ${detail}`);
  }
  return data;
}

function say(text, isError) {
  const m = $("message");
  m.textContent = text || "";
  m.className = isError ? "message error" : "message";
}

async function showStatus() {
  try {
    const h = await fetch("/health").then((r) => r.json());
    $("status").textContent = h.model_loaded
      ? `model ${h.model_version}, K=${h.interests_per_user} interests of dim ${h.embedding_dim}; ` +
        (h.milvus_reachable ? `${h.count} item vectors in Milvus collection ${h.collection}`
                            : `Milvus not reachable: ${h.error}`)
      : "model not loaded";
  } catch (e) {
    $("status").textContent = "service not reachable";
  }
}

function renderHistory() {
  const ol = $("history");
  ol.replaceChildren();
  for (const [pos, it] of picked.entries()) {
    const li = el("li", { "data-item": it.item_id });
    li.append(el("span", { class: "t" }, it.title || `item ${it.item_id}`),
              el("span", { class: "id" }, `#${it.item_id}`));
    const x = el("button", { class: "small", type: "button", title: "remove" }, "x");
    x.addEventListener("click", () => { picked.splice(pos, 1); renderHistory(); recommend(); });
    li.append(x);
    ol.append(li);
  }
  $("history-empty").hidden = picked.length > 0;
  $("recommend").disabled = picked.length === 0;
}

function addToHistory(item) {
  if (picked.some((h) => h.item_id === item.item_id)) return;
  picked.push({ item_id: item.item_id, title: item.title });
  renderHistory();
  recommend();
}

async function searchTitles() {
  const q = $("search").value.trim();
  const seq = ++searchSeq;
  const ul = $("matches");
  if (!q) { ul.replaceChildren(); return; }
  try {
    const res = await api("GET", `/items/search?q=${encodeURIComponent(q)}&limit=12`);
    if (seq !== searchSeq) return;   // a newer search is under way
    ul.replaceChildren();
    if (res.items.length === 0) ul.append(el("li", { class: "hint" }, "no known book matches"));
    for (const it of res.items) {
      const li = el("li", { "data-item": it.item_id, title: "add to the history" });
      li.append(el("span", { class: "t" }, it.title || `item ${it.item_id}`),
                el("span", { class: "id" }, `#${it.item_id}`), el("button", { class: "small", type: "button" }, "+"));
      li.addEventListener("click", () => addToHistory(it));
      ul.append(li);
    }
  } catch (e) {
    say(`search failed: ${e.message}`, true);
  }
}

async function recommend() {
  const table = $("results");
  const tbody = table.querySelector("tbody");
  if (picked.length === 0) { table.hidden = true; say(""); return; }
  const seq = ++recallSeq;
  const topK = parseInt($("topk").value, 10) || 20;
  const body = { top_k: topK, hist_item: [picked.map((h) => h.item_id)], with_scores: true,
                 with_titles: true, exclude_history: $("exclude").checked };
  say("recalling...");
  try {
    const res = await api("POST", "/rec/recall", body);
    if (seq !== recallSeq) return;   // the history changed meanwhile
    const ids = res.items[0], scores = res.scores[0], titles = res.titles[0];
    tbody.replaceChildren();
    const best = scores.length ? Math.max(...scores.map(Math.abs), 1e-9) : 1;
    ids.forEach((id, i) => {
      const tr = el("tr", { "data-item": id });
      const bar = el("span", { class: "bar" });
      bar.style.width = `${Math.max(2, Math.round(60 * Math.abs(scores[i]) / best))}px`;
      const add = el("button", { class: "small", type: "button", title: "add to the history" }, "+");
      add.addEventListener("click", () => addToHistory({ item_id: id, title: titles[i] }));
      const scoreCell = el("td", { class: "num" }, scores[i].toFixed(3) + " ");
      scoreCell.append(bar);
      const addCell = el("td");
      addCell.append(add);
      tr.append(el("td", { class: "num" }, String(i + 1)), el("td", { class: "title" }, titles[i] || "(no title)"),
                el("td", { class: "num" }, String(id)), scoreCell, addCell);
      tbody.append(tr);
    });
    table.hidden = ids.length === 0;
    const notes = res.notes && res.notes.length ? ` Notes: ${res.notes.join("; ")}` : "";
    say(`${ids.length} items recalled for a history of ${picked.length} in ${res.took_ms} ms.${notes}`);
  } catch (e) {
    if (seq !== recallSeq) return;
    table.hidden = true;
    say(`recall failed: ${e.message}`, true);
  }
}

$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(searchTitles, 150);
});
$("recommend").addEventListener("click", recommend);
$("topk").addEventListener("change", recommend);
$("exclude").addEventListener("change", recommend);
$("clear").addEventListener("click", () => { picked.length = 0; renderHistory(); recommend(); });
renderHistory();
showStatus();
