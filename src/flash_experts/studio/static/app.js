// flash-experts studio: one page over the JSON API of flash_experts/studio/app.py. No external assets.
"use strict";
const $ = (id) => document.getElementById(id);
const PALETTE = ["#e63946", "#2a9d8f", "#e9c46a", "#457b9d", "#f4a261", "#8d5fd3", "#6a994e", "#ff70a6",
                 "#4cc9f0", "#b5838d", "#9c6644", "#80b918", "#5e60ce", "#f77f00", "#06d6a0", "#adb5bd"];
const expertColor = (e) => PALETTE[e % PALETTE.length];
const params = new URLSearchParams(location.search);
let state = { models: [], runs: [] };
let lastTrace = null;

function showMessage(text) { const m = $("message"); m.textContent = text || ""; m.hidden = !text; }
function escapeText(text) { return text.replace(/\n/g, "⏎"); }

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (!response.ok) {
    let detail = response.statusText;
    try { const data = await response.json(); detail = data.error || JSON.stringify(data.detail || data); } catch (e) {}
    throw new Error(detail);
  }
  return response;
}

const CONTROLS = [["temperature", 0.8], ["top_k", 50], ["top_p", 1.0], ["min_p", 0.0], ["repetition_penalty", 1.0],
                  ["no_repeat_ngram_size", 0], ["max_new_tokens", 40], ["seed", 0]];
function buildControls(container, prefix) {
  for (const [name, value] of CONTROLS) {
    const label = document.createElement("label");
    label.textContent = name.replace(/_/g, " ") + " ";
    const input = document.createElement("input");
    input.id = `${prefix}-${name}`; input.type = "number"; input.step = "any";
    input.value = params.get(name) ?? value;
    label.appendChild(input); container.appendChild(label);
  }
}
function readControls(prefix) {
  const values = {};
  for (const [name] of CONTROLS) {
    const raw = $(`${prefix}-${name}`).value;
    values[name] = raw === "" ? null : Number(raw);
  }
  return values;
}

async function refreshState() {
  try { state = await (await api("/api/state")).json(); } catch (e) { $("models-state").textContent = "server unreachable"; return; }
  $("models-state").textContent = state.models.map((m) => `${m.name}: ${m.status}` +
    (m.status === "ready" ? (m.num_experts ? ` (${m.num_experts} experts, top-${m.top_k})` : " (dense)") : "") +
    (m.error ? ` — ${m.error}` : "")).join(" · ");
  for (const select of document.querySelectorAll(".model-select")) {
    const keep = select.value;
    select.innerHTML = state.models.map((m) => `<option value="${m.id}" ${m.status !== "ready" ? "disabled" : ""}>` +
      `${m.name} (${m.status})</option>`).join("");
    if (keep !== "") select.value = keep;
  }
  if ($("cmp-b").options.length > 1 && !$("cmp-b").dataset.touched) $("cmp-b").value = "1";
  $("run-select").innerHTML = state.runs.map((r) => `<option value="${r.id}">${r.name}</option>`).join("");
  if (state.runs.length && !$("run-plots").dataset.shown) showRun();
  const waiting = state.models.some((m) => m.status === "waiting" || m.status === "loading");
  if (waiting) setTimeout(refreshState, 1000);
  else if (params.get("autorun") && !document.body.dataset.autoran) { document.body.dataset.autoran = "1"; runGenerate(); }
}

function renderTokens(trace, container, layerPosition, promptTokens, probsBox) {
  container.innerHTML = "";
  trace.tokens.forEach((text, t) => {
    const span = document.createElement("span");
    span.className = "tok" + (t < promptTokens ? " prompt" : "");
    span.textContent = escapeText(text);
    span.dataset.token = t;
    span.dataset.id = trace.token_ids[t];
    if (trace.moe_layers.length) {
      const expert = trace.experts[layerPosition][t][0];
      span.dataset.expert = expert;
      span.style.background = expertColor(expert);
      const probs = trace.probs[layerPosition][t];
      span.title = `expert ${expert}; router probabilities: ` + probs.map((p, e) => `${e}: ${p.toFixed(3)}`).join(", ");
      span.onclick = () => {
        probsBox.innerHTML = `<b>${escapeText(text)}</b> · layer ${trace.moe_layers[layerPosition]} · ` +
          (trace.logprobs[t] === null ? "" : `log p ${trace.logprobs[t].toFixed(3)} · `) +
          probs.map((p, e) => `${e} <span class="bar" style="width:${Math.round(p * 80)}px;background:${expertColor(e)}"></span> ${p.toFixed(3)}`).join(" &nbsp; ");
      };
    }
    container.appendChild(span);
  });
}

function renderGrid(trace, container) {
  if (!trace.moe_layers.length) { container.textContent = "a dense model: no router"; return; }
  let html = "<table><tr><th>token</th>" + trace.moe_layers.map((l) => `<th>L${l}</th>`).join("") + "</tr>";
  trace.tokens.forEach((text, t) => {
    html += `<tr><td>${escapeHtml(escapeText(text))}</td>` + trace.moe_layers.map((_, i) => {
      const e = trace.experts[i][t][0];
      return `<td style="background:${expertColor(e)}" title="top-k ${trace.experts[i][t].join(", ")}">${e}</td>`;
    }).join("") + "</tr>";
  });
  container.innerHTML = html + "</table>";
}
function escapeHtml(text) { return text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }

async function runGenerate() {
  showMessage("");
  const model = Number($("gen-model").value || params.get("model") || 0);
  const body = { model, prompt: params.get("prompt") && !document.body.dataset.promptUsed ? params.get("prompt") : $("gen-prompt").value,
                 ...readControls("gen") };
  document.body.dataset.promptUsed = "1";
  $("gen-prompt").value = body.prompt;
  if ($("gen-mode").value === "card") { body.card_type = $("card-type").value; body.card_colors = $("card-colors").value; }
  $("gen-stream").textContent = ""; $("gen-tokens").innerHTML = ""; $("gen-grid").innerHTML = ""; $("gen-speed").textContent = "";
  $("gen-progress").textContent = "generating…";
  try {
    const response = await api("/api/generate", body);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, newline)); buffer = buffer.slice(newline + 1);
        if (event.type === "piece") $("gen-stream").textContent += event.text;
        else if (event.type === "error") throw new Error(event.error);
        else if (event.type === "done") showGeneration(event);
      }
    }
    $("gen-progress").textContent = "";
  } catch (error) { $("gen-progress").textContent = ""; showMessage(error.message); }
}

function showGeneration(done) {
  lastTrace = done;
  $("gen-stream").textContent = done.text;
  const layerSelect = $("gen-layer");
  layerSelect.innerHTML = done.trace.moe_layers.map((l, i) => `<option value="${i}">${l}</option>`).join("") || "<option>dense</option>";
  $("gen-speed").textContent = `${done.new_tokens} new tokens, ${done.tokens_per_second ? done.tokens_per_second.toFixed(1) : "?"} tokens/s (${done.finish_reason})`;
  renderTokens(done.trace, $("gen-tokens"), 0, done.prompt_tokens, $("gen-probs"));
  renderGrid(done.trace, $("gen-grid"));
}

async function runCompare() {
  showMessage("");
  const body = { models: [Number($("cmp-a").value), Number($("cmp-b").value)], prompt: $("cmp-prompt").value, ...readControls("cmp") };
  $("cmp-progress").textContent = "generating with both models…"; $("cmp-out").innerHTML = ""; $("cmp-routing").innerHTML = "";
  try {
    const data = await (await api("/api/compare", body)).json();
    if (data.message) showMessage(data.message);
    for (const run of data.runs) {
      const column = document.createElement("div");
      const rows = run.trace.tokens.map((text, t) => `<tr><td>${escapeHtml(escapeText(text))}</td><td>${run.trace.logprobs[t] === null ? "" : run.trace.logprobs[t].toFixed(3)}</td>` +
        (run.trace.moe_layers.length ? `<td style="background:${expertColor(run.trace.experts[0][t][0])}">${run.trace.experts[0][t][0]}</td>` : "<td>-</td>") + "</tr>").join("");
      column.innerHTML = `<h3>${escapeHtml(run.model)}</h3><pre class="stream">${escapeHtml(run.text)}</pre>` +
        `<table><tr><th>token</th><th>log p</th><th>expert (first MoE layer)</th></tr>${rows}</table>`;
      $("cmp-out").appendChild(column);
    }
    if (data.comparable) $("cmp-routing").innerHTML = routingDifference(data.runs);
    $("cmp-progress").textContent = "";
  } catch (error) { $("cmp-progress").textContent = ""; showMessage(error.message); }
}

function routingDifference(runs) {
  const [a, b] = runs.map((r) => r.trace);
  if (!a.moe_layers.length || !b.moe_layers.length) return "<p>routing: one of the models is dense</p>";
  const common = Math.min(a.prompt_tokens ?? runs[0].prompt_tokens, runs[1].prompt_tokens);
  const rows = a.moe_layers.filter((l) => b.moe_layers.includes(l)).map((layer) => {
    const i = a.moe_layers.indexOf(layer), j = b.moe_layers.indexOf(layer);
    let same = 0;
    for (let t = 0; t < common; t++) if (a.experts[i][t][0] === b.experts[j][t][0]) same++;
    return `<tr><td>L${layer}</td><td>${same}/${common}</td></tr>`;
  }).join("");
  return `<h3>Same top-1 expert on the shared prompt tokens</h3><table><tr><th>layer</th><th>agree</th></tr>${rows}</table>`;
}

async function runAttention() {
  showMessage("");
  const body = { model: Number($("att-model").value), prompt: $("att-prompt").value, layer: Number($("att-layer").value) };
  $("att-progress").textContent = "computing attention…";
  try {
    const data = await (await api("/api/attention", body)).json();
    const layerSelect = $("att-layer");
    if (layerSelect.options.length !== data.layers) {
      layerSelect.innerHTML = Array.from({ length: data.layers }, (_, i) => `<option value="${i}">${i}</option>`).join("");
      layerSelect.value = data.layer;
    }
    const headSelect = $("att-head");
    const head = Math.min(Number(headSelect.value), data.maps.length - 1);
    headSelect.innerHTML = data.maps.map((_, h) => `<option value="${h}">${h}</option>`).join(""); headSelect.value = head;
    drawHeatmap(data.maps[head], data.tokens);
    $("mem-length").value = data.tokens.length;
    $("att-progress").textContent = "";
  } catch (error) { $("att-progress").textContent = ""; showMessage(error.message); }
}

function drawHeatmap(map, tokens) {
  const canvas = $("att-canvas"), context = canvas.getContext("2d");
  const n = map.length, cell = Math.max(2, Math.floor(520 / n));
  canvas.width = canvas.height = cell * n;
  for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) {
    const p = map[i][j], shade = Math.round(255 * (1 - Math.sqrt(p)));
    context.fillStyle = `rgb(${shade},${shade},255)`;
    context.fillRect(j * cell, i * cell, cell, cell);
  }
  $("att-labels").textContent = "rows: queries, columns: keys (darker = more attention, square-root scale); tokens: " +
    tokens.map((t, i) => `${i}:${escapeText(t)}`).join(" ");
}

async function runMemory() {
  showMessage("");
  $("mem-out").textContent = "measuring in fresh processes…";
  try {
    const data = await (await api("/api/attention_memory", { model: Number($("att-model").value), prompt: $("att-prompt").value,
                                                             length: Number($("mem-length").value) })).json();
    const mib = (b) => (b / 2 ** 20).toFixed(1);
    $("mem-out").innerHTML = `<table><tr><th>attention</th><th>peak extra memory, one forward</th></tr>` +
      `<tr><td>ours (flash)</td><td>${mib(data.flash)} MiB</td></tr><tr><td>eager</td><td>${mib(data.eager)} MiB</td></tr></table>` +
      `<p class="small">length ${data.length}, ${data.heads} heads of ${data.head_dim}, fp32, causal, ${data.device}; ` +
      `measured: ${data.method}. Eager holds the (length × length) scores of every head; flash never forms them.</p>`;
  } catch (error) { $("mem-out").textContent = ""; showMessage(error.message); }
}

function plotArrived() { const note = $("plots-drawing"); if (note) note.remove(); }
function showRun() {
  const id = $("run-select").value;
  if (id === "") return;
  $("run-plots").dataset.shown = "1";
  // The server draws every plot of a run the first time one is asked for (several seconds): say so until they come.
  $("run-plots").innerHTML = `<p class="small" id="plots-drawing">drawing this run's plots (the first time takes a few seconds)…</p>` +
    ["loss", "router", "expert_load", "expert_load_time", "lr"].map((kind) =>
    `<img alt="${kind}" src="/api/runs/${id}/${kind}.png" onload="plotArrived()" onerror="plotArrived(); this.replaceWith(Object.assign(document.createElement('p'), {textContent: 'no ${kind} plot for this run'}))">`).join("");
  showAtlas(id);
}

// The expert atlas of a run (expert_atlas.json beside its metrics): per MoE layer, each expert's share and
// its tokens of highest lift; clicking an expert shows them highlighted in the contexts it took them from.
let atlas = null;
async function showAtlas(id) {
  atlas = null;
  $("atlas-layer").innerHTML = "";
  $("atlas-table").innerHTML = "";
  $("atlas-examples").innerHTML = "";
  try {
    atlas = await (await api(`/api/runs/${id}/atlas`)).json();
  } catch (error) {
    $("atlas-table").innerHTML = `<p class="small">${escapeHtml(error.message)}</p>`;
    return;
  }
  $("atlas-layer").innerHTML = atlas.layers.map((l, i) => `<option value="${i}">${l.layer}</option>`).join("");
  renderAtlasLayer();
}

function renderAtlasLayer() {
  if (!atlas || !atlas.layers.length) return;
  const layer = atlas.layers[Number($("atlas-layer").value || 0)];
  const rows = layer.experts.map((e) => {
    const tokens = e.top_tokens.map((t) =>
      `<span class="tok" style="background:${expertColor(e.expert)}">${escapeHtml(escapeText(t.text))}</span> x${t.lift.toFixed(1)} (${t.count}/${t.occurrences})`).join(" ");
    return `<tr data-expert="${e.expert}" class="atlas-row"><td>expert ${e.expert}</td><td>${(100 * e.share).toFixed(1)}%</td><td>${e.assignments.toLocaleString()}</td><td class="left">${tokens || "-"}</td></tr>`;
  }).join("");
  $("atlas-table").innerHTML = `<table><tr><th>expert</th><th>share</th><th>assignments</th><th>tokens of highest lift: lift (routed here / occurrences), at least ${atlas.min_count} routed here</th></tr>${rows}</table>`;
  for (const row of document.querySelectorAll(".atlas-row")) row.onclick = () => showAtlasExpert(layer, Number(row.dataset.expert));
  $("atlas-examples").innerHTML = "";
}

function showAtlasExpert(layer, expert) {
  const entry = layer.experts.find((e) => e.expert === expert);
  document.querySelectorAll(".atlas-row").forEach((r) => r.classList.toggle("selected", Number(r.dataset.expert) === expert));
  const examples = entry.examples.map((text) => {
    const open = text.indexOf("["), close = text.lastIndexOf("]");
    if (open < 0 || close < open) return `<div>${escapeHtml(text)}</div>`;
    return `<div>${escapeHtml(text.slice(0, open))}<mark style="background:${expertColor(expert)}">${escapeHtml(text.slice(open + 1, close))}</mark>${escapeHtml(text.slice(close + 1))}</div>`;
  }).join("");
  $("atlas-examples").innerHTML = `<p class="small">layer ${layer.layer}, expert ${expert}: where it took its top token</p>${examples || "<p class='small'>no token reached the minimum count</p>"}`;
}

// A whole card (docs/CARDS.md) drawn as a card: each token in its field, coloured by the expert its router chose
// first in the chosen MoE layer; the grammar's verdict; and how much the experts divide the fields.
const FRAME = { W: "#f4efd2", U: "#bcd3e8", B: "#b9b0aa", R: "#e8a58a", G: "#a9c79a" };
let lastCard = null;
async function runCard(write) {
  showMessage("");
  $("card-progress").textContent = write ? "the model is writing a card…" : "tracing the card…";
  try {
    const body = { model: Number($("card-model").value || 0), document: write ? "" : $("card-document").value,
                   seed: Math.floor(Math.random() * 1e6) };
    lastCard = await (await api("/api/card", body)).json();
    if (write) $("card-document").value = lastCard.document;
    $("card-layer").innerHTML = lastCard.moe_layers.map((l, i) => `<option value="${i}">${l}</option>`).join("");
    renderCard();
    $("card-progress").textContent = "";
  } catch (error) { $("card-progress").textContent = ""; showMessage(error.message); }
}
function renderCard() {
  const card = lastCard;
  const position = Number($("card-layer").value || 0);
  const boxes = { name: $("card-name"), cost: $("card-cost"), type: $("card-typeline"), text: $("card-text"), pt: $("card-pt") };
  for (const box of Object.values(boxes)) box.innerHTML = "";
  card.tokens.forEach((token, t) => {
    if (token.field === null) return;
    const box = boxes[token.field];
    const pieces = token.text.split("\n");
    pieces.forEach((piece, i) => {
      if (i > 0 && token.field === "text" && box.childNodes.length) box.appendChild(document.createElement("br"));
      if (!piece) return;
      const span = document.createElement("span");
      span.className = "tok";
      span.textContent = piece;
      span.dataset.field = token.field;
      if (card.moe_layers.length) {
        const expert = card.experts[position][t];
        span.dataset.expert = expert;
        span.style.background = expertColor(expert);
        span.title = `${token.field}: expert ${expert} (MoE layer ${card.moe_layers[position]})`;
      }
      box.appendChild(span);
    });
  });
  const colours = [...new Set(((card.card && card.card.cost) || "").match(/[WUBRG]/g) || [])];
  $("card-frame").style.background = colours.length === 1 ? FRAME[colours[0]] : colours.length > 1 ? "#e3cf87" : "#cfd3d6";
  $("card-frame").hidden = false;
  const v = card.verdict;
  $("card-verdict").innerHTML = v.passes ? `<p class="verdict-ok">a real card's grammar: it parses and passes every rule check</p>`
    : `<p class="verdict-bad">${v.parses ? "it parses, but fails" : "it does not parse"}</p><ul>` +
      Object.entries(v.failures).map(([rule, why]) => `<li><b>${escapeHtml(rule)}</b>: ${escapeHtml(why)}</li>`).join("") + "</ul>";
  const layer = card.atlas[position];
  if (!layer) { $("card-atlas").innerHTML = "<p class='small'>a dense model: no experts</p>"; return; }
  const experts = layer.shares.name.length;
  const head = "<tr><th>field</th><th>tokens</th>" + [...Array(experts).keys()].map((e) =>
    `<th style="background:${expertColor(e)}">e${e}</th>`).join("") + "</tr>";
  const rows = Object.entries(layer.shares).filter(([field]) => layer.tokens[field]).map(([field, shares]) =>
    `<tr><td>${field}</td><td>${layer.tokens[field]}</td>` + shares.map((x) => `<td>${(100 * x).toFixed(0)}%</td>`).join("") + "</tr>").join("");
  $("card-atlas").innerHTML = `<table>${head}${rows}</table><p class="small">I(field; expert) = ` +
    `${layer.information_bits.toFixed(2)} bits of H(field) = ${layer.field_entropy_bits.toFixed(2)} bits, over this card's ` +
    `${Object.values(layer.tokens).reduce((a, b) => a + b, 0)} tokens (one card: a sketch; the race's domain atlas is the same measure over thousands)</p>`;
}

for (const button of document.querySelectorAll("nav button")) {
  button.onclick = () => {
    document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b === button));
    document.querySelectorAll(".tab").forEach((tab) => { tab.hidden = tab.id !== `tab-${button.dataset.tab}`; });
  };
}
buildControls($("gen-controls"), "gen");
buildControls($("cmp-controls"), "cmp");
$("gen-run").onclick = runGenerate;
$("cmp-run").onclick = runCompare;
$("att-run").onclick = runAttention;
$("att-layer").onchange = runAttention;
$("att-head").onchange = runAttention;
$("mem-run").onclick = runMemory;
$("card-run").onclick = () => runCard(false);
$("card-write").onclick = () => runCard(true);
$("card-layer").onchange = () => lastCard && renderCard();
$("run-select").onchange = showRun;
$("atlas-layer").onchange = renderAtlasLayer;
$("cmp-b").onchange = () => { $("cmp-b").dataset.touched = "1"; };
$("gen-mode").onchange = () => { $("card-fields").hidden = $("gen-mode").value !== "card"; };
$("gen-layer").onchange = () => lastTrace && renderTokens(lastTrace.trace, $("gen-tokens"), Number($("gen-layer").value), lastTrace.prompt_tokens, $("gen-probs"));
if (params.get("prompt")) $("gen-prompt").value = params.get("prompt");
refreshState();
