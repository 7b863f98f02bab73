// vllm-zipar playground: streams partial images from POST /v1/images/generations and paints them.
// Plain browser JavaScript, no build step, no dependencies. `window.zipar` is the page's state (read by
// tests/serving/test_playground.py): every painted frame is recorded with a checksum of the canvas pixels.
"use strict";

const $ = (id) => document.getElementById(id);
const ROUTE = "/v1/images/generations";
const zipar = { info: null, runs: [], busy: false, error: null };
window.zipar = zipar;
let controller = null;

function showError(message) {
  zipar.error = message;
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadInfo() {
  const response = await fetch("/playground/info");
  const info = await response.json();
  if (!response.ok) throw new Error(info.error ? info.error.message : `HTTP ${response.status}`);
  zipar.info = info;
  const names = info.class_names || [];
  $("class-names").replaceChildren(...names.map((name, label) => {
    const option = document.createElement("option");
    option.value = name;
    option.label = String(label);
    return option;
  }));
  const prompts = info.prompt_kind === "text" ? `${info.family} text-to-image` :
    `${info.num_classes} classes${names.length ? ` (${names.slice(0, 4).join(", ")}, …)` : ""}`;
  $("model-info").textContent = `${info.model}: ${info.size} images, ${info.grid[0]}×${info.grid[1]} token grid, ` +
    `${prompts}; server default ${info.default_decoding}${info.default_window ? "-" + info.default_window : ""}`;
  $("size").replaceChildren(...(info.sizes || [info.size]).map((size) => {
    const option = document.createElement("option");
    option.value = option.textContent = size;
    return option;
  }));
  $("negative-field").hidden = !info.negative_prompt;
  if (info.prompt_kind === "text") {
    $("prompt").title = "what to draw";
    $("prompt").value = "a red apple on a wooden table";
  }
  $("window").max = String(info.grid[1]);
  if (info.default_window) $("window").value = String(Math.min(info.default_window, info.grid[1]));
  $("window-value").value = $("window").value;
  if (info.default_decoding) $("decoding").value = info.default_decoding;
  const cfg = info.sampling_defaults && info.sampling_defaults.cfg_scale;
  if (cfg) $("cfg-scale").value = String(cfg);
  $("frames").max = String(info.max_partial_frames);
  if (!names.length && info.prompt_kind !== "text") $("prompt").value = "0";
}

function newRun(title, decoding, n) {
  const section = $("run-template").content.firstElementChild.cloneNode(true);
  section.querySelector(".run-title").textContent = title;
  const canvases = [];
  for (let i = 0; i < n; i++) {
    const canvas = document.createElement("canvas");
    canvas.dataset.image = String(i);
    section.querySelector(".images").append(canvas);
    canvases.push(canvas);
  }
  $("runs").append(section);
  const run = {
    title, decoding, section, canvases, frames: [], done: false, error: null, start: performance.now(),
    seconds: 0, progress: new Array(n).fill(null), finished: 0, chain: Promise.resolve(),
  };
  zipar.runs.push(run);
  return run;
}

function checksum(data) {
  let hash = 2166136261;
  for (let i = 0; i < data.length; i++) hash = Math.imul(hash ^ data[i], 16777619);
  return (hash >>> 0).toString(16);
}

async function paint(run, event) {
  const image = new Image();
  image.src = `data:image/${event.output_format || "png"};base64,${event.b64_json}`;
  await image.decode();
  const canvas = run.canvases[event.image_index || 0];
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(image, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const final = event.type === "image_generation.completed";
  run.frames.push({
    image: event.image_index || 0, final, checksum: checksum(pixels),
    passes: event.zipar ? event.zipar.passes : null, cells: event.zipar ? event.zipar.cells_decoded : null,
  });
  if (event.zipar) run.progress[event.image_index || 0] = event.zipar;
  showStats(run, final ? "decoding" : "streaming");
}

function showStats(run, state) {
  const known = run.progress.filter(Boolean);
  const passes = Math.max(0, ...known.map((p) => p.passes));
  const cells = known.reduce((sum, p) => sum + p.cells_decoded, 0);
  const passSum = known.reduce((sum, p) => sum + p.passes, 0);
  const total = known.length ? known[0].cells * run.canvases.length : 0;
  const set = (cls, text) => { run.section.querySelector(cls).textContent = text; };
  set(".passes", String(passes));
  set(".cells-per-pass", passSum ? (cells / passSum).toFixed(2) : "–");
  set(".cells", total ? `${cells} / ${total}` : "0");
  set(".frames", String(run.frames.length));
  set(".state", state);
}

function tick() {
  const now = performance.now();
  for (const run of zipar.runs) {
    if (!run.done) run.seconds = (now - run.start) / 1000;
    run.section.querySelector(".elapsed").textContent = `${run.seconds.toFixed(2)} s`;
  }
  if (zipar.busy) requestAnimationFrame(tick);
}

function handleEvent(run, block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (name === "error" || payload.error) throw new Error(payload.error ? payload.error.message : "stream error");
  run.chain = run.chain.then(() => paint(run, payload));
}

async function streamRun(run, body, signal) {
  const response = await fetch(ROUTE, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal,
  });
  if (!response.ok) {
    const error = await response.json().catch(() => null);
    throw new Error(error && error.error ? error.error.message : `HTTP ${response.status}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      handleEvent(run, buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
    }
  }
  await run.chain;
  run.seconds = (performance.now() - run.start) / 1000;
  run.done = true;
  run.section.classList.add("done");
  showStats(run, "done");
}

function requestBody(decoding) {
  const body = { prompt: $("prompt").value, n: Number($("n").value), stream: true, size: $("size").value };
  const negative = $("negative-prompt").value.trim();
  if (zipar.info && zipar.info.negative_prompt && negative !== "") body.negative_prompt = negative;
  if (zipar.info) body.model = zipar.info.model;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const cfg = $("cfg-scale").value.trim();
  if (cfg !== "") body.cfg_scale = Number(cfg);
  const frames = Number($("frames").value);
  if (frames > 0) body.partial_frames = frames;
  body.decoding = decoding;
  if (decoding === "zipar") body.zipar_window = Number($("window").value);
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (controller) controller.abort();
  controller = new AbortController();
  const signal = controller.signal;
  showError("");
  $("runs").replaceChildren();
  zipar.runs = [];
  const race = document.querySelector("input[name=mode]:checked").value === "race";
  const decodings = race ? ["ntp", "zipar"] : [$("decoding").value];
  const n = Math.max(1, Number($("n").value) || 1);
  const runs = decodings.map((d) => newRun(d === "ntp" ? "NTP" : `ZipAR-${$("window").value}`, d, n));
  zipar.busy = true;
  $("generate").disabled = true;
  requestAnimationFrame(tick);
  const results = await Promise.allSettled(runs.map((run) => streamRun(run, requestBody(run.decoding), signal)));
  if (signal.aborted) return;
  results.forEach((result, i) => {
    if (result.status === "rejected") {
      runs[i].error = result.reason.message;
      runs[i].done = true;
      runs[i].section.classList.add("failed");
      showStats(runs[i], "failed");
    }
  });
  const failed = results.find((result) => result.status === "rejected");
  if (failed) showError(failed.reason.message);
  if (race && !failed) showRaceSummary(runs);
  zipar.busy = false;
  $("generate").disabled = false;
  tick();
}

function showRaceSummary([ntp, zip]) {
  const passes = (run) => Math.max(...run.progress.map((p) => (p ? p.passes : 0)));
  const line = document.createElement("p");
  line.className = "summary";
  line.textContent = `${zip.title}: ${passes(zip)} passes vs ${passes(ntp)} for NTP ` +
    `(${(passes(ntp) / passes(zip)).toFixed(2)}× fewer), ${zip.seconds.toFixed(2)} s vs ${ntp.seconds.toFixed(2)} s`;
  $("runs").append(line);
}

$("window").addEventListener("input", () => { $("window-value").value = $("window").value; });
$("controls").addEventListener("submit", generate);
loadInfo().then(() => { zipar.ready = true; }, (error) => { showError(error.message); zipar.ready = true; });
