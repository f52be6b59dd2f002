// The inspection page: score dropped or chosen images, show verdicts and heatmaps, send feedback, explain.
// Plain JavaScript, nothing fetched but this service's own API.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { results: [], current: null, scored: 0, flagged: 0, token: "" };

function fmt(value, digits = 3) {
  return value === null || value === undefined ? "n/a" : Number(value).toFixed(digits);
}

function verdict(result) {
  if (result.is_anomalous === null || result.is_anomalous === undefined) return { word: "no threshold", cls: "" };
  return result.is_anomalous ? { word: "ANOMALOUS", cls: "anomalous" } : { word: "GOOD", cls: "good" };
}

async function api(path, options = {}) {
  const headers = options.headers || {};
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: response.statusText }; }
  if (!response.ok) {
    const error = new Error(body && body.error ? body.error : response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

async function refreshModel() {
  try {
    const model = await api("/v1/model");
    $("model-backbone").textContent = model.backbone.join(", ");
    $("model-bank").textContent = model.memory_bank_size.toLocaleString() + " patches from " + model.n_train + " images";
    $("model-threshold").textContent = fmt(model.thresholds.image);
    $("model-pixel-threshold").textContent = fmt(model.thresholds.pixel);
    $("model-id").textContent = model.model_id.slice(0, 16);
    $("model-id").dataset.full = model.model_id;
    $("model-updates").textContent = String(model.feedback_updates) +
      (model.feedback_pending ? " (" + model.feedback_pending + " pending)" : "");
    $("model-status").textContent = model.last_update_error ? "last update failed: " + model.last_update_error : "";
    return model;
  } catch (error) {
    $("model-status").textContent = "model unavailable: " + error.message;
    return null;
  }
}

function renderCounters() {
  $("count-scored").textContent = String(state.scored);
  $("count-flagged").textContent = String(state.flagged);
}

function addCard(result, file) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  const v = verdict(result);
  button.type = "button";
  if (v.cls) button.classList.add(v.cls);
  button.setAttribute("aria-label", result.filename + ": " + v.word + ", score " + fmt(result.score) +
    ", normalised " + fmt(result.normalized_score) + ". Open the large view");
  const img = document.createElement("img");
  img.src = result.thumbnail;
  img.alt = "Uploaded image " + result.filename;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = result.filename;
  const scores = document.createElement("span");
  scores.className = "scores";
  scores.textContent = "score " + fmt(result.score) + " · normalised " + fmt(result.normalized_score);
  const word = document.createElement("span");
  word.className = "verdict " + v.cls;
  word.textContent = v.word;
  button.append(img, name, scores, word);
  button.addEventListener("click", () => openDetail(result));
  item.append(button);
  $("results").prepend(item);
}

async function scoreFiles(files) {
  const list = Array.from(files).filter((f) => f.size > 0);
  if (!list.length) return;
  const form = new FormData();
  for (const file of list) form.append("files", file, file.name);
  $("upload-status").textContent = "scoring " + list.length + " image(s)…";
  try {
    const body = await api("/v1/predict?overlay=true", { method: "POST", body: form });
    body.results.forEach((result, i) => {
      result.thumbnail = URL.createObjectURL(list[i]);
      result.model_id = body.model_id;
      state.results.push(result);
      state.scored += 1;
      if (result.is_anomalous) state.flagged += 1;
      addCard(result, list[i]);
    });
    renderCounters();
    $("upload-status").textContent = "scored " + body.results.length + " image(s) with model " + body.model_id.slice(0, 16);
  } catch (error) {
    $("upload-status").textContent = "error: " + error.message;
  }
}

function openDetail(result) {
  state.current = result;
  const v = verdict(result);
  $("detail").hidden = false;
  $("detail-title").textContent = result.filename;
  $("detail-summary").innerHTML = "";
  const word = document.createElement("strong");
  word.className = "verdict " + v.cls;
  word.textContent = v.word;
  $("detail-summary").append(word, document.createTextNode(
    " · score " + fmt(result.score) + " (threshold " + fmt(result.threshold) + ") · normalised " +
    fmt(result.normalized_score) + " · " + result.width + " × " + result.height + " px"));
  $("detail-image").src = result.thumbnail;
  $("detail-image").alt = "Image " + result.filename;
  $("detail-overlay").src = "data:image/png;base64," + result.overlay_png;
  $("detail-overlay").alt = "Heatmap of anomaly scores over " + result.filename + " (blue normal, red anomalous)";
  if (result.outline_png) {
    $("detail-outline").hidden = false;
    $("detail-outline").src = "data:image/png;base64," + result.outline_png;
    $("detail-outline").alt = "Outline of the region at or above the pixel threshold";
  } else {
    $("detail-outline").hidden = true;
  }
  applyOpacity();
  $("feedback-status").textContent = "";
  $("explanation").hidden = true;
  $("mark-good").focus();
}

function applyOpacity() {
  $("detail-overlay").style.opacity = String(Number($("opacity").value) / 100);
}

async function markGood() {
  const result = state.current;
  if (!result) return;
  if ($("token").value) state.token = $("token").value;
  $("feedback-status").textContent = "sending feedback…";
  try {
    const before = $("model-id").dataset.full;
    const body = await api("/v1/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image_id: result.image_id }),
    });
    $("feedback-status").textContent = "marked good; updating the model (" + body.pending + " pending)…";
    for (let i = 0; i < 600; i++) {
      await new Promise((resolve) => setTimeout(resolve, 500));
      const model = await refreshModel();
      if (model && model.model_id !== before && !model.feedback_pending) {
        $("feedback-status").textContent = "model updated: " + model.model_id.slice(0, 16) + " (" +
          model.memory_bank_size.toLocaleString() + " patches)";
        return;
      }
      if (model && model.last_update_error) {
        $("feedback-status").textContent = "update failed: " + model.last_update_error;
        return;
      }
    }
  } catch (error) {
    if (error.status === 401) {
      $("token-label").hidden = false;
      $("token").focus();
      $("feedback-status").textContent = "this service needs its token for feedback: enter it and press Mark as good again";
    } else {
      $("feedback-status").textContent = "error: " + error.message;
    }
  }
}

async function explain() {
  const result = state.current;
  if (!result) return;
  $("feedback-status").textContent = "explaining…";
  try {
    const body = await api("/v1/explain?image_id=" + encodeURIComponent(result.image_id));
    const p = body.patch;
    $("explain-patch").src = "data:image/png;base64," + body.patch_crop_png;
    $("explain-patch").alt = "Most anomalous patch of " + result.filename;
    $("explain-patch-caption").textContent = "most anomalous patch: rows " + p.box[0] + "–" + p.box[2] +
      ", columns " + p.box[1] + "–" + p.box[3] + " (patch score " + fmt(p.score) + ")";
    const n = body.nearest;
    if (body.nearest_crop_png) {
      $("explain-nearest").hidden = false;
      $("explain-nearest").src = "data:image/png;base64," + body.nearest_crop_png;
      $("explain-nearest").alt = "Nearest normal patch, from training image " + n.path;
      $("explain-nearest-caption").textContent = "nearest normal patch: " + n.path + ", rows " + n.box[0] + "–" +
        n.box[2] + ", columns " + n.box[1] + "–" + n.box[3];
    } else {
      $("explain-nearest").hidden = true;
      $("explain-nearest-caption").textContent = "nearest normal patch: " + (n.path ? n.path + ": " : "") + body.status;
    }
    $("explanation").hidden = false;
    $("feedback-status").textContent = "";
  } catch (error) {
    $("feedback-status").textContent = "no explanation: " + error.message;
  }
}

function setup() {
  const drop = $("drop");
  drop.addEventListener("click", (event) => { if (event.target !== $("files")) $("files").click(); });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("files").click(); }
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    scoreFiles(event.dataTransfer.files);
  });
  $("files").addEventListener("change", (event) => { scoreFiles(event.target.files); event.target.value = ""; });
  $("opacity").addEventListener("input", applyOpacity);
  $("mark-good").addEventListener("click", markGood);
  $("explain").addEventListener("click", explain);
  $("close-detail").addEventListener("click", () => { $("detail").hidden = true; });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") $("detail").hidden = true; });
  refreshModel();
}

setup();
