// The experiments page of `python -m client serve`: plain JavaScript, no build step, no framework.
// Everything it shows comes from serve's own endpoints: the experiments and their features (with the
// parameters each takes and the recommended ranges) from GET /api/image_editing/experiments, the edit from
// POST /api/edit_with_comfyui, its progress from GET /api/progress/<id> (server-sent events). A page served
// elsewhere can point at serve with ?api=http://host:8000 (serve then needs --cors-origin for that origin).
"use strict";

const API = (new URLSearchParams(location.search).get("api") || "").replace(/\/+$/, "");
const TOKEN_KEY = "editkit-serve-token";
const LABELS = {
  prompt: "Edit instruction", negative_prompt: "Negative prompt", steps: "Steps", guidance_scale: "Guidance",
  strength: "Strength", seed: "Seed", extend_left: "Left", extend_top: "Top", extend_right: "Right",
  extend_bottom: "Bottom",
};
const HINTS = {
  prompt: "what to change, e.g. “change the background to a modern gym”",
  strength: "how much of the picture may change (1 = all)",
  guidance_scale: "how closely to follow the instruction",
};
const TEXT_PARAMETERS = ["prompt", "negative_prompt"];
const SIDES = ["extend_left", "extend_top", "extend_right", "extend_bottom"];
const FRACTIONAL = ["guidance_scale", "strength"];

const state = { experiments: [], experiment: null, feature: null, pictures: [], running: false, waiting: [] };
const $ = (selector, root = document) => root.querySelector(selector);

// -- talking to serve ------------------------------------------------------------------------------------------

function headers(extra = {}) {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

let tokenAsked = null;  // one question for every call that met a 401 meanwhile

function askToken() {
  if (!tokenAsked) {
    const form = $("#token-form");
    form.hidden = false;
    $("#token").focus();
    tokenAsked = new Promise((resolve) => {
      form.onsubmit = (event) => {
        event.preventDefault();
        localStorage.setItem(TOKEN_KEY, $("#token").value.trim());
        form.hidden = true;
        tokenAsked = null;
        resolve();
      };
    });
  }
  return tokenAsked;
}

async function call(path, options = {}) {
  for (;;) {
    const response = await fetch(API + path, { ...options, headers: headers(options.headers || {}) });
    if (response.status !== 401) return response;
    if (localStorage.getItem(TOKEN_KEY)) {
      localStorage.removeItem(TOKEN_KEY);
      $("[data-error-for=token]").textContent = "That token was refused; try again.";
    }
    await askToken();
  }
}

async function followProgress(requestId, onEvent, signal) {
  // Server-sent events read with fetch (EventSource cannot send the token header).
  const response = await call(`/api/progress/${requestId}`, { signal });
  if (!response.ok || !response.body) return;
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}

// -- experiments and features ----------------------------------------------------------------------------------

async function loadExperiments() {
  const status = $("#experiments-status");
  try {
    const response = await call("/api/image_editing/experiments");
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    state.experiments = body.experiments;
  } catch (error) {
    status.textContent = `The experiments could not be loaded: ${error.message}`;
    status.classList.add("field-error");
    return;
  }
  if (!state.experiments.length) {
    status.textContent = "This server offers no experiment (see its experiments file).";
    return;
  }
  renderExperiments();
  selectExperiment(state.experiments[0]);
}

function choice(label, detail, checked, onPick, data) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "choice";
  button.setAttribute("role", "radio");
  button.setAttribute("aria-checked", String(checked));
  Object.assign(button.dataset, data);
  const strong = document.createElement("strong");
  strong.textContent = label;
  button.append(strong);
  if (detail) {
    const small = document.createElement("small");
    small.textContent = detail;
    button.append(small);
  }
  button.addEventListener("click", onPick);
  return button;
}

function renderExperiments() {
  const box = $("#experiments");
  box.replaceChildren(...state.experiments.map((experiment) => choice(
    experiment.name, [experiment.description, (experiment.models || []).join(" · ")].filter(Boolean).join(" — "),
    experiment === state.experiment, () => selectExperiment(experiment), { experiment: experiment.id })));
}

function selectExperiment(experiment) {
  state.experiment = experiment;
  renderExperiments();
  const box = $("#features");
  const pick = (feature) => () => selectFeature(feature);
  box.replaceChildren(...experiment.features.map((feature) => choice(
    feature.name, "", false, pick(feature), { feature: feature.id })));
  selectFeature(experiment.features[0]);
}

function selectFeature(feature) {
  state.feature = feature;
  for (const button of $("#features").children) {
    button.setAttribute("aria-checked", String(button.dataset.feature === feature.id));
  }
  const ranges = Object.entries(feature.recommended || {}).map(([name, r]) => `${LABELS[name] || name} ${r.min}–${r.max}`);
  $("#feature-ranges").textContent = ranges.length ? `Recommended: ${ranges.join(", ")}` : "";
  renderPictures();
  renderFields();
  clearErrors();
  showResult("cutout", null, feature.cutout ? "—" : "This feature returns no cut-out");
  updateButton();
}

// -- pictures ------------------------------------------------------------------------------------------------

function renderPictures() {
  const count = Math.max(1, state.feature.pictures || 1);
  state.pictures = state.pictures.slice(0, count);
  const box = $("#pictures");
  box.replaceChildren();
  for (let index = 0; index < count; index++) {
    const slot = document.createElement("div");
    slot.className = "picture-slot";
    const zone = document.createElement("label");
    zone.className = "drop";
    zone.dataset.slot = String(index);
    const input = document.createElement("input");
    input.type = "file";
    input.accept = "image/png,image/jpeg,image/webp";
    input.multiple = index === 0 && count > 1;
    input.dataset.slot = String(index);
    input.addEventListener("change", () => addFiles(index, input.files));
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      addFiles(index, event.dataTransfer.files);
    });
    const picture = state.pictures[index];
    if (picture) {
      const img = document.createElement("img");
      img.src = picture.url;
      img.alt = picture.name;
      zone.append(img);
    }
    const text = document.createElement("span");
    text.textContent = picture ? picture.name : (index === 0 ? (count > 1 ? "Picture 1 (edited): drop or pick" :
      "Drop a PNG/JPG here or pick one") : `Picture ${index + 1} (reference, optional)`);
    zone.append(text, input);
    const error = document.createElement("span");
    error.className = "field-error";
    error.dataset.errorFor = index === 0 ? "input_image_base64" : `extra_images_base64[${index - 1}]`;
    slot.append(zone, error);
    box.append(slot);
  }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, url: reader.result });
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(start, files) {
  const count = Math.max(1, state.feature.pictures || 1);
  let slot = start;
  for (const file of files) {
    if (slot >= count) break;
    state.pictures[slot++] = await readFile(file);
  }
  if (state.pictures[0]) showResult("original", state.pictures[0].url);
  renderPictures();
  clearErrors();
  updateButton();
}

// -- parameters ----------------------------------------------------------------------------------------------

function renderFields() {
  const box = $("#fields");
  box.replaceChildren();
  const feature = state.feature;
  const names = Object.keys(feature.parameters || {});
  for (const name of names.filter((n) => TEXT_PARAMETERS.includes(n))) box.append(textField(name, feature));
  for (const name of names.filter((n) => !TEXT_PARAMETERS.includes(n) && !SIDES.includes(n))) {
    box.append(numberField(name, feature));
  }
  const sides = names.filter((n) => SIDES.includes(n));
  if (sides.length) box.append(sidesField(sides, feature));
}

function fieldBox(name, label, hint) {
  const box = document.createElement("div");
  box.className = "field";
  box.dataset.field = name;
  const title = document.createElement("label");
  title.htmlFor = `field-${name}`;
  title.textContent = label;
  if (hint) {
    const small = document.createElement("span");
    small.className = "hint";
    small.textContent = hint;
    title.append(small);
  }
  box.append(title);
  return box;
}

function errorSlot(name) {
  const error = document.createElement("p");
  error.className = "field-error";
  error.dataset.errorFor = name;
  return error;
}

function textField(name, feature) {
  const box = fieldBox(name, LABELS[name] || name, HINTS[name]);
  const area = document.createElement("textarea");
  area.id = `field-${name}`;
  area.name = name;
  area.rows = name === "prompt" ? 3 : 1;
  area.placeholder = String(feature.parameters[name] ?? "");
  area.addEventListener("input", updateButton);
  box.append(area, errorSlot(name));
  return box;
}

function numberField(name, feature) {
  const range = (feature.recommended || {})[name];
  const value = range ? range.default : feature.parameters[name];
  const hint = range ? `recommended ${range.min}–${range.max}` : HINTS[name];
  const box = fieldBox(name, LABELS[name] || name, hint);
  const row = document.createElement("div");
  row.className = "range";
  const number = document.createElement("input");
  number.type = "number";
  number.id = `field-${name}`;
  number.name = name;
  number.value = value ?? "";
  number.step = FRACTIONAL.includes(name) ? "0.05" : "1";
  number.min = "0";
  if (range) {
    const slider = document.createElement("input");
    slider.type = "range";
    slider.min = range.min;
    slider.max = range.max;
    slider.step = number.step;
    slider.value = value;
    slider.setAttribute("aria-label", `${LABELS[name] || name} (recommended range)`);
    slider.addEventListener("input", () => { number.value = slider.value; });
    number.addEventListener("input", () => { slider.value = number.value; });
    row.append(slider);
  }
  row.append(number);
  box.append(row, errorSlot(name));
  return box;
}

function sidesField(sides, feature) {
  const box = fieldBox("extend", "Extend the canvas (pixels)", "each side");
  const grid = document.createElement("div");
  grid.className = "sides";
  for (const name of sides) {
    const label = document.createElement("label");
    label.textContent = LABELS[name] || name;
    label.dataset.field = name;
    const input = document.createElement("input");
    input.type = "number";
    input.min = "0";
    input.step = "8";
    input.name = name;
    input.id = `field-${name}`;
    input.value = feature.parameters[name] ?? 0;
    label.append(input, errorSlot(name));
    grid.append(label);
  }
  box.append(grid);
  return box;
}

function requestBody() {
  const feature = state.feature;
  const body = { experiment_id: state.experiment.id, feature_id: feature.id };
  body.input_image_base64 = state.pictures[0].url.split(",", 2)[1];
  const extra = state.pictures.slice(1).filter(Boolean).map((p) => p.url.split(",", 2)[1]);
  if (extra.length) body.extra_images_base64 = extra;
  for (const name of Object.keys(feature.parameters || {})) {
    const input = document.getElementById(`field-${name}`);
    if (!input || input.value === "") continue;
    body[name] = TEXT_PARAMETERS.includes(name) ? input.value : Number(input.value);
  }
  return body;
}

// -- errors ----------------------------------------------------------------------------------------------------

function clearErrors() {
  for (const slot of document.querySelectorAll("[data-error-for]")) {
    if (slot.dataset.errorFor !== "token") slot.textContent = "";
  }
  for (const input of document.querySelectorAll(".invalid")) input.classList.remove("invalid");
}

function showError(message) {
  // The API names the field in its message ('steps', 'extra_images_base64[0]', "invalid value for seed"):
  // the message goes next to that field, or under the button when it names none on this page.
  const named = [...message.matchAll(/'([a-z_][a-z0-9_]*(?:\[\d+\])?)'/g)].map((m) => m[1]);
  const listed = /invalid value for ([a-z0-9_, ]+):/.exec(message);
  if (listed) named.push(...listed[1].split(",").map((s) => s.trim()));
  for (const name of named) {
    const slot = document.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
    if (slot) {
      slot.textContent = message;
      const input = document.getElementById(`field-${name}`);
      if (input) input.classList.add("invalid");
      return;
    }
  }
  $("#form-error").textContent = message;
}

// -- the edit --------------------------------------------------------------------------------------------------

function updateButton() {
  $("#edit").disabled = !state.feature || !state.pictures[0];
}

function showResult(kind, url, placeholder = "—") {
  const figure = document.querySelector(`[data-result=${kind}]`);
  const img = $("img", figure);
  const link = $(".download", figure);
  const size = $(".size", figure);
  if (!url) {
    img.hidden = true;
    img.removeAttribute("src");
    link.hidden = true;
    size.textContent = "";
    $(".placeholder", figure).textContent = placeholder;
    $(".placeholder", figure).hidden = false;
    return;
  }
  size.textContent = "";
  img.onload = () => { size.textContent = `${img.naturalWidth}×${img.naturalHeight}`; };
  img.onerror = () => { size.textContent = "the browser cannot show this file"; };
  img.src = url;
  img.hidden = false;
  link.href = url;
  link.hidden = false;
  $(".placeholder", figure).hidden = true;
}

function progressView() {
  let nodes = 0;
  const done = new Set();
  let current = null;
  const bar = $("#progress-bar");
  const text = $("#progress-text");
  $("#progress").hidden = false;
  bar.value = 0;
  text.textContent = "Sent; waiting for a ComfyUI server…";
  return (event) => {
    if (event.stage === "queued") {
      nodes = event.nodes || 0;
      text.textContent = "In ComfyUI's queue…";
    } else if (event.stage === "started") {
      text.textContent = "Started";
    } else if (event.stage === "cached") {
      for (const node of event.nodes) done.add(node);
    } else if (event.stage === "executing") {
      if (current) done.add(current);
      current = event.node;
      text.textContent = `Running: ${event.title || event.node}`;
    } else if (event.stage === "progress" && event.max) {
      text.textContent = `${event.title || event.node}: step ${event.value} of ${event.max}`;
    }
    if (nodes) {
      const within = event.stage === "progress" && event.max ? event.value / event.max : 0;
      bar.value = Math.min(1, (done.size + within) / nodes);
    }
    if (event.stage === "done") { bar.value = 1; text.textContent = "Done"; }
    if (event.stage === "error") text.textContent = "Failed";
  };
}

async function runEdit(body) {
  state.running = true;
  clearErrors();
  const requestId = crypto.randomUUID();
  const stop = new AbortController();
  const view = progressView();
  const following = followProgress(requestId, view, stop.signal).catch(() => {});
  try {
    const response = await call("/api/edit_with_comfyui", {
      method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "X-Request-Id": requestId },
    });
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok || !answer.success) {
      showError(answer.error || `HTTP ${response.status}`);
      view({ stage: "error" });
      return;
    }
    view({ stage: "done" });
    showResult("result", `data:image/png;base64,${answer.output_image_base64}`);
    showResult("cutout", answer.background_removed_image_base64
      ? `data:image/png;base64,${answer.background_removed_image_base64}` : null,
      "This feature returns no cut-out");
    $("#progress-text").textContent = `Done in ${answer.elapsed_time.toFixed(1)} s`;
  } catch (error) {
    $("#form-error").textContent = `The server could not be reached: ${error.message}`;
  } finally {
    stop.abort();
    await following;
    state.running = false;
    next();
  }
}

function next() {
  const body = state.waiting.shift();
  $("#queue-note").textContent = state.waiting.length
    ? `${state.waiting.length} more edit(s) queued; each starts when the one before it ends` : "";
  if (body) {
    if (!state.waiting.length) $("#queue-note").textContent = "Queued edit started";
    runEdit(body);
  }
}

function submit() {
  if (!state.pictures[0]) return;
  const body = requestBody();
  showResult("original", state.pictures[0].url);
  if (state.running) {
    state.waiting.push(body);
    $("#queue-note").textContent = `An edit is running: this one is queued (${state.waiting.length} waiting) and ` +
      "starts when it ends";
    return;
  }
  showResult("result", null);
  runEdit(body);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#edit").addEventListener("click", submit);
  loadExperiments();
});
