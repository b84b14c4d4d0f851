// torchserve-xai viewer: one page that calls TorchServe's inference and management APIs from the
// browser (TorchServe must allow this page's origin: cors_allowed_origin) and shows what comes back.
// Everything the server sends is put on the page as text (textContent), never as markup.
"use strict";

const DEFAULTS = { inference: "http://127.0.0.1:8080", management: "http://127.0.0.1:8081" };
// The server does not list a model's allowed explainers yet: offer every registered one and let
// the server's refusal (its error.message) say which are not allowed.
const KNOWN_EXPLAINERS = [
  "saliency", "input_x_gradient", "guided_backprop", "deconvnet", "integrated_gradients",
  "smoothgrad", "grad_cam", "guided_grad_cam", "occlusion", "grad_cam_plus_plus", "xgrad_cam",
  "hires_cam", "layer_cam", "normgrad", "eigen_cam", "score_cam", "ablation_cam", "lrp",
];
const PREFERRED_DEFAULTS = ["guided_backprop", "grad_cam"];
const COLORMAPS = { sequential: ["inferno", "hot", "gray"], diverging: ["coolwarm", "bwr", "gray"] };
const DEFAULT_TOP_K = 5;
const STORAGE_KEY = "torchserve-xai-viewer";

const $ = (id) => document.getElementById(id);

const state = {
  inference: DEFAULTS.inference,
  management: DEFAULTS.management,
  inferenceToken: "",
  managementToken: "",
  model: null,
  explainers: KNOWN_EXPLAINERS.slice(),
  image: null,           // {base64, url, name}
  target: null,          // class index chosen by clicking, null: the model's top class
  classes: new Map(),    // index -> label, learnt from predictions
  topK: new Map(),       // model -> how many classes the server lets us ask for
  sequence: 0,           // newer requests win: a late answer to an older one is dropped
};

// --- small helpers ---------------------------------------------------------------------------

function element(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "className") node.className = value;
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

// Method names are long snake_case words: let a narrow caption break them after an underscore.
function breakable(name) {
  const parts = String(name).split("_");
  const nodes = [];
  parts.forEach((part, i) => {
    if (i > 0) nodes.push("_", document.createElement("wbr"));
    nodes.push(part);
  });
  return nodes;
}

function trimSlash(url) { return url.trim().replace(/\/+$/, ""); }

function formatScore(score) {
  if (typeof score !== "number") return "";
  if (score >= 0.001) return (score * 100).toFixed(score >= 0.995 ? 2 : 1) + " %";
  if (score === 0) return "< 1e-6";  // the server rounds scores to six decimals
  return score.toExponential(1);
}

function formatNumber(value) {
  if (typeof value !== "number") return String(value);
  return Math.abs(value) >= 0.01 || value === 0 ? value.toFixed(3) : value.toExponential(2);
}

function bytesToBase64(bytes) {
  let binary = "";
  const chunk = 0x8000;  // String.fromCharCode takes its arguments on the stack
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

function setStatus(text) { $("status").textContent = text; }

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

// --- talking to TorchServe -------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

// The message a person should read: ours ({"error": {"message"}}), TorchServe's own
// ({"code", "type", "message"}), or the status line.
function replyMessage(status, body) {
  if (body && typeof body === "object") {
    if (body.error && typeof body.error.message === "string") return body.error.message;
    if (typeof body.message === "string") return body.message;
  }
  if (typeof body === "string" && body.trim()) return `HTTP ${status}: ${body.trim().slice(0, 300)}`;
  return `HTTP ${status}`;
}

async function call(base, path, { method = "GET", document = null, token = "" } = {}) {
  const headers = {};
  if (document !== null) headers["Content-Type"] = "application/json";
  if (token) headers["Authorization"] = `Bearer ${token}`;
  const url = base + path;
  const started = performance.now();
  let response;
  try {
    response = await fetch(url, {
      method, headers, body: document === null ? undefined : JSON.stringify(document),
      mode: "cors", credentials: "omit", cache: "no-store",
    });
  } catch (error) {
    // fetch hides the reason from scripts: a stopped server and a CORS refusal look the same.
    throw new ApiError(
      `Cannot reach ${url}. Is TorchServe running there, and does its config allow this page's origin ` +
      `(cors_allowed_origin=${location.origin})?`, 0, null);
  }
  const text = await response.text();
  const elapsed = performance.now() - started;
  let body = text;
  try { body = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: keep the text */ }
  if (!response.ok) throw new ApiError(replyMessage(response.status, body), response.status, body);
  return { body, ms: elapsed };
}

// --- connection and models -------------------------------------------------------------------

function readConnection() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}"); } catch (_) { saved = {}; }
  const query = new URLSearchParams(location.search);
  state.inference = trimSlash(query.get("inference") || saved.inference || DEFAULTS.inference);
  state.management = trimSlash(query.get("management") || saved.management || DEFAULTS.management);
  $("inference-url").value = state.inference;
  $("management-url").value = state.management;
}

function saveConnection() {
  // Addresses only: keys are secrets and stay in memory.
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify({ inference: state.inference, management: state.management }));
  } catch (_) { /* storage may be off; the page works without it */ }
}

async function connect() {
  state.inference = trimSlash($("inference-url").value);
  state.management = trimSlash($("management-url").value);
  state.inferenceToken = $("inference-token").value.trim();
  state.managementToken = $("management-token").value.trim();
  $("server-summary").textContent = state.inference;
  saveConnection();
  showError("");
  const select = $("model-select");
  select.disabled = true;
  select.replaceChildren(element("option", {}, "loading…"));
  try {
    const { body } = await call(state.management, "/models?limit=100", { token: state.managementToken });
    const names = (body && Array.isArray(body.models) ? body.models : []).map((m) => m.modelName);
    select.replaceChildren(...names.map((name) => element("option", { value: name }, name)));
    if (!names.length) {
      select.replaceChildren(element("option", {}, "no models"));
      setStatus("The server has no models loaded.");
      return;
    }
    select.disabled = false;
    const keep = names.includes(state.model) ? state.model : names[0];
    select.value = keep;
    await chooseModel(keep);
  } catch (error) {
    select.replaceChildren(element("option", {}, "—"));
    showError(`Listing models failed: ${error.message}`);
  }
}

function parseMetadata(value) {
  if (!value) return null;
  if (typeof value === "object") return value;
  try { return JSON.parse(value); } catch (_) { return null; }
}

async function chooseModel(name) {
  if (name !== state.model) {
    state.classes = new Map();
    state.target = null;
  }
  state.model = name;
  let allowed = KNOWN_EXPLAINERS.slice();
  let defaults = PREFERRED_DEFAULTS;
  let note = "Allowed explainers are not published by the server: all are offered, a refused one is reported.";
  try {
    const { body } = await call(state.management, `/models/${encodeURIComponent(name)}?customized=true`,
                                { token: state.managementToken });
    const description = Array.isArray(body) ? body[0] : body;
    const workers = (description && description.workers) || [];
    const ready = workers.filter((w) => w.status === "READY").length;
    $("model-info").textContent =
      `${ready}/${workers.length} workers ready · batch size ${description.batchSize ?? "?"}`;
    const metadata = parseMetadata(description && description.customizedMetadata);
    if (metadata) {
      const listed = metadata.allowed_explainers || metadata.explainers;
      // Allowed but unable to explain this model (e.g. lrp and an operation it has no rule for): not offered.
      const unavailable = Array.isArray(metadata.unavailable_explainers) ? metadata.unavailable_explainers : [];
      if (Array.isArray(listed) && listed.length) {
        allowed = listed.filter((n) => !unavailable.includes(n));
        note = "";
      }
      if (Array.isArray(metadata.default_explainers)) defaults = metadata.default_explainers;
      if (Array.isArray(metadata.class_names)) metadata.class_names.forEach((label, i) => state.classes.set(i, label));
    }
  } catch (error) {
    $("model-info").textContent = `Could not describe ${name}: ${error.message}`;
  }
  state.explainers = allowed;
  renderExplainerChoices(allowed, defaults);
  $("explainer-note").textContent = note;
  updateCompareChoices();
  updateButtons();
  if (state.image) explain();
}

function renderExplainerChoices(names, defaults) {
  const previous = new Set(checkedExplainers());
  const chosen = previous.size ? previous : new Set(defaults.filter((n) => names.includes(n)));
  if (!chosen.size && names.length) chosen.add(names[0]);
  $("explainer-list").replaceChildren(...names.map((name) =>
    element("label", { className: "chip" },
      element("input", { type: "checkbox", value: name, checked: chosen.has(name) }), element("span", {}, name))));
}

function checkedExplainers() {
  return [...document.querySelectorAll("#explainer-list input:checked")].map((input) => input.value);
}

// --- the image -------------------------------------------------------------------------------

async function useImage(blob, name) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  if (state.image && state.image.url) URL.revokeObjectURL(state.image.url);
  state.image = { base64: bytesToBase64(bytes), url: URL.createObjectURL(blob), name: name || "pasted image" };
  state.target = null;
  updateButtons();
  await explain();
}

function firstImageFile(items) {
  for (const item of items || []) {
    const file = item.getAsFile ? (item.kind === "file" ? item.getAsFile() : null) : item;
    if (file) return file;
  }
  return null;
}

async function loadExamples() {
  try {
    const response = await fetch("examples/index.json", { cache: "no-store" });
    if (!response.ok) return;
    const names = await response.json();
    $("examples").replaceChildren(...names.map((name) => {
      const button = element("button", { type: "button", title: `Use ${name}`, dataset: { example: name } },
        element("img", { src: `examples/${encodeURIComponent(name)}`, alt: "" }),
        name.replace(/\.[a-z]+$/i, ""));
      button.addEventListener("click", async () => {
        const reply = await fetch(`examples/${encodeURIComponent(name)}`);
        if (reply.ok) await useImage(await reply.blob(), name);
      });
      return button;
    }));
  } catch (_) { /* examples are a convenience: the page works without them */ }
}

// --- requests --------------------------------------------------------------------------------

function renderOptions() {
  const polarity = $("polarity").value;
  const options = {
    polarity,
    clip: [Number($("clip-low").value), Number($("clip-high").value)],
    overlay_alpha: Number($("opacity").value),
  };
  options[polarity === "both" ? "diverging_colormap" : "colormap"] = $("colormap").value;
  if ($("encoding").value === "overlay") options.overlay_base = $("overlay-base").value;
  options.frame = $("frame").value;
  return options;
}

function requestDocument(explainers, target) {
  const document = {
    image: state.image.base64,
    explain: explainers,
    encoding: $("encoding").value,
    render: renderOptions(),
    top_k: state.topK.get(state.model) || DEFAULT_TOP_K,
  };
  if (target !== null && target !== undefined) document.target = target;
  if ($("quality").checked) document.quality = true;
  return document;
}

// A model with fewer classes than we ask for says how many it has: ask again with that many.
async function predict(explainers, target) {
  const path = `/predictions/${encodeURIComponent(state.model)}`;
  try {
    return await call(state.inference, path, { method: "POST", document: requestDocument(explainers, target), token: state.inferenceToken });
  } catch (error) {
    const match = /top_k must be an integer in \[1, (\d+)\]/.exec(error.message);
    if (!match || state.topK.get(state.model) === Number(match[1])) throw error;
    state.topK.set(state.model, Number(match[1]));
    return call(state.inference, path, { method: "POST", document: requestDocument(explainers, target), token: state.inferenceToken });
  }
}

async function explain() {
  if (!state.image || !state.model) return;
  const explainers = checkedExplainers();
  const sequence = ++state.sequence;
  showError("");
  document.body.classList.add("busy");
  setStatus(`Asking ${state.model} about ${state.image.name}…`);
  try {
    const { body, ms } = await predict(explainers, state.target);
    if (sequence !== state.sequence) return;
    renderResult(body, ms);
  } catch (error) {
    if (sequence !== state.sequence) return;
    showError(error.message);
    setStatus(error.status ? `The server refused the request (HTTP ${error.status}).` : "No answer.");
    renderInputOnly();
  } finally {
    if (sequence === state.sequence) document.body.classList.remove("busy");
  }
}

// --- rendering results -----------------------------------------------------------------------

function renderResult(body, ms) {
  const predictions = (body && body.predictions) || [];
  predictions.forEach((p) => state.classes.set(p.index, p.label));
  renderPredictions(predictions);
  const explanations = (body && body.explanations) || {};
  const failures = (body && body.explanation_errors) || {};
  const figures = [inputFigure()];
  let firstTarget = null;
  for (const [method, value] of Object.entries(explanations)) {
    for (const entry of Array.isArray(value) ? value : [value]) {
      figures.push(mapFigure(method, entry));
      if (firstTarget === null && entry.target) firstTarget = entry.target;
    }
  }
  for (const [method, failure] of Object.entries(failures)) {
    figures.push(failureFigure(method, failure));
  }
  $("maps").replaceChildren(...figures);
  $("target-label").textContent = firstTarget
    ? `explaining “${firstTarget.label}”${state.target === null ? " (the top class)" : ""}` : "";
  const count = Object.keys(explanations).length;
  setStatus(`${state.model} answered in ${Math.round(ms)} ms (measured in this browser)` +
    (count ? ` with ${count} explanation${count > 1 ? "s" : ""}` : "") +
    (Object.keys(failures).length ? `; ${Object.keys(failures).length} failed` : "") + ".");
  if (Object.keys(failures).length) {
    showError(Object.entries(failures).map(([m, f]) => `${m}: ${(f && f.message) || "failed"}`).join("\n"));
  }
  updateCompareChoices();
}

function renderInputOnly() {
  $("maps").replaceChildren(inputFigure());
  $("target-label").textContent = "";
}

function renderPredictions(predictions) {
  const top = predictions.length ? predictions[0].index : null;
  const bars = predictions.map((p) => {
    const selected = state.target === null ? p.index === top : p.index === state.target;
    const fill = element("span", { className: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`;
    const button = element("button", {
      type: "button", className: selected ? "selected" : "",
      title: `Explain ${p.label}`, dataset: { index: p.index, label: p.label },
    },
    element("span", { className: "label" }, p.label),
    element("span", { className: "track" }, fill),
    element("span", { className: "score" }, formatScore(p.score)));
    button.addEventListener("click", () => {
      state.target = p.index === top ? null : p.index;
      explain();
    });
    return element("li", {}, button);
  });
  $("prediction-bars").replaceChildren(...bars);
  $("auto-target").hidden = state.target === null;
}

function inputFigure() {
  if (!state.image) return element("span");
  return element("figure", { className: "map input", dataset: { role: "input" } },
    element("img", { src: state.image.url, alt: "input image" }),
    element("figcaption", {}, element("strong", {}, "input"), element("span", {}, state.image.name)));
}

function mapFigure(method, entry, extraCaption = null) {
  const src = entry.encoding === "png" || entry.encoding === "overlay" ? `data:image/png;base64,${entry.data}` : null;
  const caption = [element("strong", {}, ...breakable(method))];
  if (extraCaption) caption.push(extraCaption);
  if (entry.target) caption.push(`for “${entry.target.label}”`);
  if (typeof entry.latency_ms === "number") caption.push(`${entry.latency_ms.toFixed(1)} ms on the server`);
  if (entry.rule_sites && typeof entry.rule_sites === "object") {
    const sites = Object.entries(entry.rule_sites).map(([kind, n]) => `${kind} ${n}`).join(", ");
    caption.push(`rule sites: ${sites || "none"}`);
  }
  if (entry.quality && typeof entry.quality.deletion_auc === "number") {
    caption.push(`deletion AUC ${entry.quality.deletion_auc.toFixed(3)}`);
  }
  if (entry.scale) caption.push(`scale ${formatNumber(entry.scale.min)} … ${formatNumber(entry.scale.max)}`);
  if (entry.sanity !== undefined) {
    caption.push(element("span", { className: "extra" }, `sanity: ${JSON.stringify(entry.sanity)}`));
  }
  const picture = src
    ? element("img", { src, alt: `${method} for ${entry.target ? entry.target.label : "the top class"}`, className: "map-image" })
    : element("div", { className: "failure" }, `encoding ${entry.encoding} is not shown here`);
  return element("figure", {
    className: "map explanation",
    dataset: { method, target: entry.target ? entry.target.label : "" },
  }, picture, element("figcaption", {}, ...caption.map((item) => (item instanceof Node ? item : element("span", {}, item)))));
}

function failureFigure(method, failure) {
  return element("figure", { className: "map failed", dataset: { method } },
    element("div", { className: "failure" }, (failure && failure.message) || "failed"),
    element("figcaption", {}, element("strong", {}, ...breakable(method)), element("span", {}, (failure && failure.code) || "")));
}

// --- compare classes -------------------------------------------------------------------------

function updateCompareChoices() {
  const method = $("compare-method");
  const keepMethod = method.value;
  method.replaceChildren(...state.explainers.map((n) => element("option", { value: n }, n)));
  method.value = state.explainers.includes(keepMethod) ? keepMethod
    : (state.explainers.includes("guided_backprop") ? "guided_backprop" : state.explainers[0] || "");
  const classes = [...state.classes.entries()].sort((a, b) => a[0] - b[0]);
  const ranked = [...document.querySelectorAll("#prediction-bars button")].map((b) => Number(b.dataset.index));
  for (const [id, rank] of [["compare-a", 0], ["compare-b", 1]]) {
    const select = $(id);
    const keep = select.value;
    select.replaceChildren(...classes.map(([index, label]) => element("option", { value: index }, label)));
    if (classes.some(([index]) => String(index) === keep)) select.value = keep;
    else if (ranked.length > rank) select.value = String(ranked[rank]);
  }
  updateButtons();
}

async function compare() {
  if (!state.image || !state.model) return;
  const method = $("compare-method").value;
  const targets = [Number($("compare-a").value), Number($("compare-b").value)];
  showError("");
  setStatus(`Comparing ${method} for two classes…`);
  $("compare-maps").replaceChildren();
  try {
    const started = performance.now();
    const replies = await Promise.all(targets.map((target) => predict([method], target)));
    const figures = replies.map(({ body }) => {
      const entry = body.explanations && body.explanations[method];
      if (!entry) {
        const failure = (body.explanation_errors || {})[method];
        return failureFigure(method, failure || { message: "no explanation in the answer" });
      }
      return mapFigure(method, Array.isArray(entry) ? entry[0] : entry);
    });
    $("compare-maps").replaceChildren(inputFigure(), ...figures);
    setStatus(`Compared ${method} for two classes in ${Math.round(performance.now() - started)} ms (two requests, measured in this browser).`);
  } catch (error) {
    showError(error.message);
    setStatus("The comparison failed.");
  }
}

// --- wiring ----------------------------------------------------------------------------------

function updateColormapChoices() {
  const family = $("polarity").value === "both" ? COLORMAPS.diverging : COLORMAPS.sequential;
  const select = $("colormap");
  const keep = select.value;
  select.replaceChildren(...family.map((name) => element("option", { value: name }, name)));
  select.value = family.includes(keep) ? keep : family[0];
}

function updateButtons() {
  const ready = Boolean(state.image && state.model);
  $("explain-button").disabled = !ready;
  $("compare-button").disabled = !ready || !$("compare-a").value || !$("compare-b").value;
  $("overlay-base").disabled = $("encoding").value !== "overlay";
  $("opacity").disabled = $("encoding").value !== "overlay";
}

function wire() {
  $("connection-form").addEventListener("submit", (event) => { event.preventDefault(); connect(); });
  $("model-select").addEventListener("change", (event) => chooseModel(event.target.value));
  $("file-input").addEventListener("change", (event) => {
    const file = event.target.files && event.target.files[0];
    if (file) useImage(file, file.name);
    event.target.value = "";  // choosing the same file again still counts as a change
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = firstImageFile(event.dataTransfer && event.dataTransfer.files);
    if (file) useImage(file, file.name);
  });
  document.addEventListener("paste", (event) => {
    if (event.target instanceof HTMLInputElement && event.target.type !== "file") return;  // pasting a URL or key
    const file = firstImageFile(event.clipboardData && event.clipboardData.items);
    if (file) { event.preventDefault(); useImage(file, file.name || "pasted image"); }
  });
  $("explain-button").addEventListener("click", explain);
  $("auto-target").addEventListener("click", () => { state.target = null; explain(); });
  $("compare-button").addEventListener("click", compare);
  $("polarity").addEventListener("change", updateColormapChoices);
  $("encoding").addEventListener("change", updateButtons);
  $("opacity").addEventListener("input", () => { $("opacity-value").textContent = Number($("opacity").value).toFixed(2); });
  for (const id of ["compare-a", "compare-b"]) $(id).addEventListener("change", updateButtons);
}

wire();
// On a phone the results sit below the controls: keep the long rendering form folded there.
if (window.matchMedia("(max-width: 760px)").matches) $("rendering").open = false;
updateColormapChoices();
readConnection();
loadExamples();
connect();
