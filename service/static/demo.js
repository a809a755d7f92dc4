// The demo page: a photo goes through the service's own HTTP API (POST v1/encode for the token
// grid, POST v1/reconstruct for the decoded image and its X-PSNR-dB); nothing is computed here
// that the API already answers. No framework, no build step, no request leaves the service.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "vqtok-api-key";
let run = 0; // the newest photo wins: answers for an older one are dropped
let tokensUrl = null;
let originalUrl = null;
let lastFile = null; // a new resize choice or API key re-runs the photo on screen

class ProblemError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

// Errors are problem+json (RFC 9457): `detail` says what to fix (field, limit, value received).
async function problemFrom(response) {
  let text = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    text = `${body.status || response.status} ${body.title || ""}: ${body.detail || ""}`;
  } catch (_) {
    // not JSON: keep the status line
  }
  if (response.status === 401) text += " (enter the service's API key above)";
  return new ProblemError(response.status, text);
}

async function request(path, init, read) {
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...init.headers } });
  } catch (err) {
    throw new ProblemError(0, `could not reach the service: ${err.message}`);
  }
  if (!response.ok) throw await problemFrom(response);
  const body = await read(response);
  return { response, body, ms: performance.now() - started };
}

function uploadForm(field, file) {
  const form = new FormData();
  form.append(field, file, file.name || "photo");
  form.append("resize", $("resize").value);
  return form;
}

// -- token colours --------------------------------------------------------------------------

// Hues a golden angle apart, with a few lightness/saturation steps: neighbouring code indices
// get clearly different colours, and a code has the same colour in every grid.
function codeColour(code) {
  const hue = (code * 137.508) % 360;
  const saturation = 0.75 - (Math.floor(code / 4) % 3) * 0.17;
  const lightness = 0.38 + (code % 4) * 0.11;
  return hslToRgb(hue, saturation, lightness);
}

function hslToRgb(hue, s, l) {
  const a = s * Math.min(l, 1 - l);
  const channel = (n) => {
    const k = (n + hue / 30) % 12;
    return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
  };
  return [channel(0), channel(8), channel(4)];
}

// One canvas pixel per token; CSS scales it up (image-rendering: pixelated). With `highlight`,
// every other code is dimmed so the cells sharing that code stand out.
function drawGrid(canvas, tokens, highlight = null) {
  const h = tokens.length;
  const w = tokens[0].length;
  canvas.width = w;
  canvas.height = h;
  const context = canvas.getContext("2d");
  const image = context.createImageData(w, h);
  for (let row = 0; row < h; row++) {
    for (let col = 0; col < w; col++) {
      const code = tokens[row][col];
      let [r, g, b] = codeColour(code);
      if (highlight !== null && code !== highlight) [r, g, b] = [r, g, b].map((v) => v * 0.25);
      image.data.set([r, g, b, 255], (row * w + col) * 4);
    }
  }
  context.putImageData(image, 0, 0);
}

function showHover(canvas, tokens, event) {
  const box = canvas.getBoundingClientRect();
  const h = tokens.length;
  const w = tokens[0].length;
  const col = Math.min(w - 1, Math.floor(((event.clientX - box.left) / box.width) * w));
  const row = Math.min(h - 1, Math.floor(((event.clientY - box.top) / box.height) * h));
  if (row < 0 || col < 0) return;
  const code = tokens[row][col];
  const count = tokens.reduce((n, line) => n + line.filter((c) => c === code).length, 0);
  $("token-hover").textContent = `code ${code} at (row ${row}, col ${col}) · ${count}× in this grid`;
  if (canvas.dataset.highlight !== String(code)) {
    canvas.dataset.highlight = String(code);
    drawGrid(canvas, tokens, code);
  }
}

function attachHover(canvas, tokens) {
  canvas.onmousemove = (event) => showHover(canvas, tokens, event);
  canvas.onmouseleave = () => {
    delete canvas.dataset.highlight;
    drawGrid(canvas, tokens);
    $("token-hover").textContent = "tokens: one colour per code (hover for the index)";
  };
}

// -- one photo through the API --------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showResult(file, encoded, reconstructed) {
  const item = encoded.body.items[0];
  const [h, w] = item.shape;
  const model = encoded.body.model;
  const psnr = reconstructed.response.headers.get("X-PSNR-dB");
  // the service's own rounding, shown as sent: one place decides how PSNR is written
  $("psnr").textContent = psnr === "inf" ? "∞ dB (identical)" : `${psnr} dB`;
  $("model-id").textContent = reconstructed.response.headers.get("X-Model-Id") || model.id;
  $("latency").textContent =
    `encode ${Math.round(encoded.ms)} ms · reconstruct ${Math.round(reconstructed.ms)} ms`;
  const distinct = new Set(item.tokens.flat()).size;
  $("grid-size").textContent =
    `${h} × ${w} (h × w) · ${distinct} of ${model.codebook_size} codes used`;

  const canvas = $("token-grid");
  drawGrid(canvas, item.tokens);
  attachHover(canvas, item.tokens);

  const reconstruction = $("reconstruction");
  reconstruction.onload = () => {
    // the original is cropped to what the model saw (fit: the centre square; pad: all of it)
    $("original").style.aspectRatio =
      `${reconstruction.naturalWidth} / ${reconstruction.naturalHeight}`;
    URL.revokeObjectURL(reconstruction.dataset.url);
  };
  const reconstructionUrl = URL.createObjectURL(reconstructed.body);
  reconstruction.dataset.url = reconstructionUrl;
  reconstruction.src = reconstructionUrl;
  $("original-caption").textContent =
    $("resize").value === "fit" ? "original (centre crop, as the model saw it)" : "original";

  if (tokensUrl) URL.revokeObjectURL(tokensUrl);
  const json = JSON.stringify(encoded.body);
  tokensUrl = URL.createObjectURL(new Blob([json], { type: "application/json" }));
  const download = $("download");
  download.href = tokensUrl;
  download.download = `${(file.name || "photo").replace(/\.[^.]*$/, "")}.tokens.json`;
  $("result").hidden = false;
}

async function tokenize(file) {
  const mine = ++run;
  lastFile = file;
  showError("");
  $("status").textContent = `tokenizing ${file.name || "photo"}…`;
  if (originalUrl) URL.revokeObjectURL(originalUrl);
  originalUrl = URL.createObjectURL(file);
  try {
    // one after the other, so each latency is that request's own
    const encoded = await request(
      "v1/encode", { method: "POST", body: uploadForm("images", file) }, (r) => r.json());
    const reconstructed = await request(
      "v1/reconstruct", { method: "POST", body: uploadForm("image", file) }, (r) => r.blob());
    if (mine !== run) return;
    $("original").src = originalUrl;
    showResult(file, encoded, reconstructed);
    $("status").textContent = `${file.name || "photo"}: done`;
  } catch (err) {
    if (mine !== run) return;
    $("result").hidden = true;
    $("status").textContent = "";
    showError(err.message);
  }
}

// -- the model line and the inputs ----------------------------------------------------------

async function showModel() {
  try {
    const { body } = await request("v1/model", { method: "GET" }, (r) => r.json());
    const size = body.image_size ? ` · native ${body.image_size} px` : "";
    $("model-card").textContent =
      `model ${body.id} · f = ${body.downsample} · ${body.codebook_size} codes${size}`;
  } catch (err) {
    $("model-card").textContent =
      err.status === 401 ? "model: this service needs an API key" : `model: ${err.message}`;
  }
}

function wireInputs() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    showModel();
    if (lastFile) tokenize(lastFile); // e.g. the photo a missing key was refused for
  });
  $("resize").addEventListener("change", () => {
    if (lastFile) tokenize(lastFile);
  });
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) tokenize(file);
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) tokenize(file);
  });
}

wireInputs();
showModel();
