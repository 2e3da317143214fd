// sdlab's web page: a plain script over the same /sdapi/v1 API that scripts and plug-ins use,
// plus /sdlab/v1/model-info for the one thing that API does not say (a model's native size).
"use strict";

const API = "/sdapi/v1";
const $ = (id) => document.getElementById(id);
const GENERATE_TABS = ["txt2img", "img2img", "inpaint"];

function emptyResult() {
  return { images: [], infotexts: [], seeds: [], subseeds: [], subseedStrength: 0, selected: 0 };
}

const ui = {
  mode: "txt2img",          // txt2img | img2img | inpaint | pnginfo | settings
  busy: false,
  // Each generating tab keeps its own results: txt2img never shows the last inpaint.
  results: Object.fromEntries(GENERATE_TABS.map((t) => [t, emptyResult()])),
  initImage: null,          // HTMLImageElement loaded into the img2img / inpaint canvas
  pngParams: null,          // parsed parameters from the PNG Info tab
  model: null,              // /sdlab/v1/model-info of the selected checkpoint
  options: {},              // GET /options, as last read
  lightbox: false,
  embeddings: {},           // GET /embeddings' loaded ones
  error: null,              // what the error box shows
  settingsStatus: null,     // [what, isError] of the Settings tab's status line
  modelLoading: false,      // a checkpoint is being loaded
};

// -- the form's numbers: what each field must hold, and its name in the API -----------------------

// `label`: the field's name, a key of the translation table (i18n.js).
const FIELDS = {
  steps: { label: "steps", api: "steps", integer: true, min: 1 },
  cfg: { label: "cfg", api: "cfg_scale", min: 0 },
  width: { label: "width", api: "width", integer: true, min: 8, multipleOf: 8 },
  height: { label: "height", api: "height", integer: true, min: 8, multipleOf: 8 },
  "n-iter": { label: "n_iter", api: "n_iter", integer: true, min: 1 },
  "batch-size": { label: "batch_size", api: "batch_size", integer: true, min: 1 },
  seed: { label: "seed", api: "seed", integer: true, min: -1, exact: true },
  subseed: { label: "subseed", api: "subseed", integer: true, min: -1, exact: true },
  "subseed-strength": { label: "subseed_strength", api: "subseed_strength", min: 0, max: 1 },
  "clip-skip": { label: "clip_skip", integer: true, min: 1, max: 12 },
  denoising: { label: "denoising", api: "denoising_strength", min: 0, max: 1 },
  "mask-blur": { label: "mask.blur", api: "mask_blur", integer: true, min: 0 },
  padding: { label: "padding.short", api: "inpaint_full_res_padding", integer: true, min: 0 },
  "hr-scale": { label: "hr.scale", api: "hr_scale", min: 1, max: 8 },
  "hr-steps": { label: "hr.steps", api: "hr_second_pass_steps", integer: true, min: 0 },
  "hr-denoising": { label: "hr.denoising", api: "denoising_strength", min: 0, max: 1 },
};

// The form field an API field name belongs to: of two (img2img's and hires fix's denoising),
// the one on the screen.
function fieldOfApi(name) {
  const ids = Object.keys(FIELDS).filter((id) => FIELDS[id].api === name);
  return ids.find((id) => $(id).offsetParent !== null) || ids[0];
}

// A message kept as what makes it (a key and its values), so that it can be said again in
// another language: `render()` gives the text in the current one.
class PageError extends Error {
  constructor(render) {
    super(render());
    this.render = render;
  }
}
const pageError = (key, vars) => new PageError(() => t(key, vars));

// A problem of one field: the field's name and what is wrong, in the current language.
const fieldProblem = (id, problemKey, vars, name) =>
  ({ id, render: () => t("err.field", { name: name || t(FIELDS[id].label), problem: t(problemKey, vars) }) });

// An error that belongs to form fields: [{id, render}], each shown on its field too.
class FieldErrors extends PageError {
  constructor(problems) {
    super(() => problems.map((p) => p.render()).join(t("err.sep")));
    this.fields = problems;
  }
}

// A number from a field, or a problem: never a silent 0 for an empty or unreadable field.
function readField(id, problems) {
  const el = $(id), f = FIELDS[id];
  const raw = el.value.trim();
  let msg = null, vars = null, value = null;
  if (el.validity && el.validity.badInput) msg = "err.not.number";
  else if (raw === "") msg = "err.empty";
  else {
    value = Number(raw);
    if (!Number.isFinite(value)) msg = "err.not.number";
    else if (f.integer && !/^-?\d+$/.test(raw)) msg = "err.whole";
    else if (f.min !== undefined && value < f.min) [msg, vars] = ["err.min", { n: f.min }];
    else if (f.max !== undefined && value > f.max) [msg, vars] = ["err.max", { n: f.max }];
    else if (f.multipleOf && value % f.multipleOf) {
      const near = Math.max(f.multipleOf, Math.round(value / f.multipleOf) * f.multipleOf);
      [msg, vars] = ["err.multiple", { n: f.multipleOf, near }];
    }
  }
  if (msg) { problems.push(fieldProblem(id, msg, vars)); return null; }
  // Seeds past 2^53 lose digits as JS numbers: send the digits, and let the API check the range.
  if (f.exact && !Number.isSafeInteger(value)) return raw;
  return value;
}

function markFields(problems) {
  for (const { id, render } of problems) {
    const el = $(id);
    if (!el) continue;
    el.classList.add("invalid");
    el.setAttribute("aria-invalid", "true");
    let note = $(id + "-error");
    if (!note) {
      note = document.createElement("span");
      note.id = id + "-error";
      note.className = "field-error";
      el.insertAdjacentElement("afterend", note);
    }
    note.textContent = render();
  }
}

function clearField(id) {
  const el = $(id);
  el.classList.remove("invalid");
  el.removeAttribute("aria-invalid");
  const note = $(id + "-error");
  if (note) note.remove();
}

function clearFields() { for (const id of Object.keys(FIELDS)) clearField(id); }

function focusFirst(problems) { if (problems.length && $(problems[0].id)) $(problems[0].id).focus(); }

// -- HTTP -------------------------------------------------------------------------------

async function api(path, options = {}) {
  const url = path.startsWith("/sdlab/") ? path : API + path;
  const init = { method: options.body === undefined ? "GET" : "POST", headers: {} };
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  const res = await fetch(url, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!res.ok) throw apiError(res.status, data, text);
  return data;
}

// The API's answer as one line a person reads: sdlab's own message as it is, pydantic's list
// of problems in the page's words, anything else (a proxy's error page) as its first line.
function apiError(status, data, text) {
  const detail = data && typeof data === "object" && data.detail !== undefined ? data.detail : null;
  // sdlab's own messages are the server's words, in English.
  if (typeof detail === "string") return new Error(detail);
  if (Array.isArray(detail)) {
    const problems = detail.map((d) => {
      const loc = (d.loc || []).filter((x) => x !== "body");
      const id = fieldOfApi(loc[0]);
      const name = () => (id ? t(FIELDS[id].label) : loc.join(".") || t("err.request"));
      return { id, render: () => t("err.field", { name: name(), problem: friendlyMessage(d) }) };
    });
    return new FieldErrors(problems);
  }
  const line = String(typeof data === "string" ? data : text || "").split("\n")[0].slice(0, 200);
  return line ? pageError("err.status", { status, line }) : pageError("err.status.empty", { status });
}

// pydantic's words for a field's problem, in the page's (and the current language's).
function friendlyMessage(d) {
  const m = String(d.msg || "");
  const rules = [
    [/^Input should be greater than or equal to (.+)$/, "err.min"],
    [/^Input should be less than or equal to (.+)$/, "err.max"],
    [/^Input should be greater than (.+)$/, "err.gt"],
    [/^Input should be less than (.+)$/, "err.lt"],
    [/valid integer/, "err.whole"],
    [/valid number/, "err.number"],
    [/^Field required$/, "err.required"],
  ];
  for (const [re, key] of rules) {
    const found = re.exec(m);
    if (found) return t(key, { n: found[1] });
  }
  return m.charAt(0).toLowerCase() + m.slice(1);
}

// The error box: an Error, a PageError (said again in the new language on a switch), or text.
function showError(err, focus = true) {
  const box = $("error");
  ui.error = err || null;
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = err.render ? err.render() : String(err.message || err);
  if (err.fields) {
    markFields(err.fields.filter((p) => p.id));
    if (focus) focusFirst(err.fields);
  }
}

// -- lists: models, samplers, schedules, LoRAs, embeddings, styles ---------------------------------

function fillSelect(select, items, current) {
  select.innerHTML = "";
  for (const { value, label, title } of items) {
    const opt = document.createElement("option");
    opt.value = value;
    opt.textContent = label;
    if (title) opt.title = title;
    select.appendChild(opt);
  }
  if (current !== undefined && current !== null) select.value = current;
}

async function loadModels() {
  const [models, options] = await Promise.all([api("/sd-models"), api("/options")]);
  ui.options = options;
  const current = options.sd_model_checkpoint;
  const items = models.map((m) => ({ value: m.title, label: m.title }));
  if (current && !items.some((i) => i.value === current)) items.unshift({ value: current, label: current });
  fillSelect($("model"), items, current);
  fillSelect($("refiner"), [{ value: "", label: t("none") }, ...items]);
  $("refiner").options[0].dataset.i18n = "none";
  return options;
}

// The form's fields that are options too start at the server's values.
function syncFormFromOptions(options) {
  if (options.CLIP_stop_at_last_layers !== undefined) $("clip-skip").value = options.CLIP_stop_at_last_layers;
  if (options.sd_noise_schedule) $("noise-schedule").value = options.sd_noise_schedule;
}

async function loadLists() {
  const [samplers, schedulers] = await Promise.all([api("/samplers"), api("/schedulers")]);
  fillSelect($("sampler"), samplers.map((s) => ({ value: s.name, label: s.name })), "Euler a");
  fillSelect($("scheduler"), schedulers.map((s) => ({ value: s.label, label: tOr("schedule." + s.label, s.label) })),
             "Automatic");
  for (const opt of $("scheduler").options) {
    if (I18N.en["schedule." + opt.value]) opt.dataset.i18n = "schedule." + opt.value;
  }
  const [latent, upscalers] = await Promise.all([api("/latent-upscale-modes").catch(() => [{ name: "Latent" }]),
                                                 api("/upscalers").catch(() => [])]);
  // "None" would be no upscale at all: not a hires fix
  const names = [...latent.map((m) => m.name), ...upscalers.map((u) => u.name).filter((n) => n !== "None")];
  fillSelect($("hr-upscaler"), names.map((n) => ({ value: n, label: n })), $("hr-upscaler").value || "Latent");
}

async function loadNetworks() {
  const [loras, embeddings] = await Promise.all([api("/loras").catch(() => []),
                                                 api("/embeddings").catch(() => ({ loaded: {} }))]);
  if (loras.length) {
    fillSelect($("lora"), loras.map((l) => ({ value: l.name, label: l.alias || l.name })), $("lora").value);
  }
  ui.embeddings = embeddings.loaded || {};
  if (Object.keys(ui.embeddings).length) fillEmbeddings();
}

function fillEmbeddings() {
  const names = Object.keys(ui.embeddings).sort();
  fillSelect($("embedding"), names.map((n) => {
    const e = ui.embeddings[n];
    const key = e.vectors > 1 ? "embedding.vectors.n" : "embedding.vectors.1";
    return { value: n, label: e.vectors ? t(key, { name: n, n: e.vectors }) : n };
  }), names.includes($("embedding").value) ? $("embedding").value : undefined);
}

async function loadStyles() {
  let styles;
  try { styles = await api("/prompt-styles"); } catch (e) { return; } // a server without styles
  if (!Array.isArray(styles) || !styles.length) return;
  const list = $("styles-list");
  const on = new Set(selectedStyles());
  list.innerHTML = "";
  for (const s of styles) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = s.name;
    box.checked = on.has(s.name);
    box.onchange = updateStylesCount;
    label.dataset.prompt = s.prompt || "";
    label.dataset.negative = s.negative_prompt || "";
    label.title = styleTitle(label);
    label.append(box, " " + s.name);
    list.appendChild(label);
  }
  $("styles-box").hidden = false;
}

function styleTitle(label) {
  const { prompt, negative } = label.dataset;
  return [prompt, negative && t("styles.negative", { text: negative })].filter(Boolean).join("\n");
}

function selectedStyles() { return [...document.querySelectorAll("#styles-list input:checked")].map((b) => b.value); }
function updateStylesCount() {
  const n = selectedStyles().length;
  $("styles-count").textContent = n ? t("styles.count", { n }) : "";
}

// -- the model: switching, and its native size ---------------------------------------------------

// Options that load the model (again): the checkpoint, and how its weights are stored.
async function setModelOption(body) {
  $("model").disabled = true;
  ui.modelLoading = true;
  renderModelStatus();
  let failed = null;
  try {
    await api("/options", { body });
  } catch (e) {
    failed = e;
  } finally {
    $("model").disabled = false;
    ui.modelLoading = false;
    await loadModels().catch(showError);
    await loadModelInfo(false);
  }
  if (failed) { showError(failed); throw failed; }
}

async function loadModelInfo(initial) {
  let info;
  try { info = await api("/sdlab/v1/model-info"); } catch (e) { info = null; }
  const before = ui.model;
  ui.model = info;
  const n = info && info.native_size;
  renderModelStatus();
  if (n && initial) setSize(n, n);
  else if (n && before && before.native_size && before.native_size !== n) followSize(n);
  updateSizeHint();
}

function renderModelStatus() {
  const n = ui.model && ui.model.native_size;
  $("model-status").textContent = ui.modelLoading ? t("model.loading")
    : n ? t("model.status", { family: ui.model.family_label, n }) : "";
}

const round8 = (v) => Math.max(8, Math.round(v / 8) * 8);

function setSize(w, h) {
  $("width").value = w;
  $("height").value = h;
  clearField("width");
  clearField("height");
  updateHiresSize();
}

// A new model with another native size: its native area, in the shape (aspect) the fields had.
function followSize(native) {
  const w = Number($("width").value), h = Number($("height").value);
  const aspect = w > 0 && h > 0 ? w / h : 1;
  setSize(round8(native * Math.sqrt(aspect)), round8(native / Math.sqrt(aspect)));
}

function updateSizeHint() {
  const n = ui.model && ui.model.native_size;
  const w = Number($("width").value), h = Number($("height").value);
  const ratio = (w * h) / (n * n);
  if (!n || !(w > 0 && h > 0) || (ratio < 2 && ratio > 0.25)) { $("size-hint").hidden = true; return; }
  const name = ui.model.title.replace(/ \[[0-9a-f]+\]$/, "");
  const effect = t(ratio >= 2 ? "size.hint.large" : "size.hint.small");
  $("size-hint-text").textContent = t("size.hint", { name, n, w, h, effect });
  $("size-native").textContent = t("size.native", { n });
  $("size-hint").hidden = false;
}

// Hires fix's output size, as the web UI computes it: int(side * scale).
function updateHiresSize() {
  const w = Number($("width").value), h = Number($("height").value), s = Number($("hr-scale").value);
  $("hr-size").textContent = w > 0 && h > 0 && s > 0
    ? t("hr.size", { w, h, W: Math.floor(w * s), H: Math.floor(h * s) }) : "";
}

// -- the prompt box ---------------------------------------------------------------------------

function insertAtCursor(text) {
  const box = $("prompt");
  const start = box.selectionStart ?? box.value.length;
  const end = box.selectionEnd ?? box.value.length;
  const before = box.value.slice(0, start);
  const sep = before && !/[\s,]$/.test(before) ? ", " : "";
  box.value = before + sep + text + box.value.slice(end);
  box.focus();
  const pos = (before + sep + text).length;
  box.setSelectionRange(pos, pos);
}

// -- tabs ---------------------------------------------------------------------------------------

function setTab(tab) {
  ui.mode = tab;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  document.body.className = "mode-" + tab;
  $("generate-view").hidden = !GENERATE_TABS.includes(tab);
  $("pnginfo-view").hidden = tab !== "pnginfo";
  $("settings-view").hidden = tab !== "settings";
  if (tab === "inpaint" && $("denoising").dataset.touched !== "1") $("denoising").value = "1";
  if (tab === "img2img" && $("denoising").dataset.touched !== "1") $("denoising").value = "0.75";
  if (tab === "inpaint") sizeMaskCanvas();
  if (GENERATE_TABS.includes(tab)) showResults();
  if (tab === "settings") loadSettings();
}

// -- the init image and the mask --------------------------------------------------------------

function loadImageFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const img = new Image();
      img.onload = () => resolve({ img, dataUrl: reader.result });
      img.onerror = () => reject(pageError("err.not.image", { file: file.name }));
      img.src = reader.result;
    };
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setInitImage(img) {
  ui.initImage = img;
  const c = $("image-canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  c.getContext("2d").drawImage(img, 0, 0);
  const m = $("mask-canvas");
  m.width = img.naturalWidth;
  m.height = img.naturalHeight;
  setSize(round8(img.naturalWidth), round8(img.naturalHeight));
  updateSizeHint();
  $("dropzone-init").querySelector(".hint").hidden = true;
  $("canvas-wrap").hidden = false;
}

function sizeMaskCanvas() {
  const m = $("mask-canvas"), c = $("image-canvas");
  if (m.width !== c.width || m.height !== c.height) { m.width = c.width; m.height = c.height; }
}

function setupBrush() {
  const m = $("mask-canvas");
  let drawing = false, last = null;
  const point = (ev) => {
    const r = m.getBoundingClientRect();
    return { x: (ev.clientX - r.left) * (m.width / r.width), y: (ev.clientY - r.top) * (m.height / r.height) };
  };
  const stroke = (p) => {
    const ctx = m.getContext("2d");
    const scale = m.width / m.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = Number($("brush").value) * scale;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (last) { ctx.moveTo(last.x, last.y); ctx.lineTo(p.x, p.y); ctx.stroke(); }
    else { ctx.arc(p.x, p.y, ctx.lineWidth / 2, 0, Math.PI * 2); ctx.fill(); }
    last = p;
  };
  m.addEventListener("pointerdown", (ev) => { drawing = true; last = null; m.setPointerCapture(ev.pointerId); stroke(point(ev)); });
  m.addEventListener("pointermove", (ev) => { if (drawing) stroke(point(ev)); });
  const end = () => { drawing = false; last = null; };
  m.addEventListener("pointerup", end);
  m.addEventListener("pointercancel", end);
  $("mask-clear").onclick = () => m.getContext("2d").clearRect(0, 0, m.width, m.height);
}

// An uploaded mask (white = repaint) becomes the brush layer, greys kept as partial strokes.
async function uploadMask(file) {
  if (!ui.initImage) throw pageError("err.mask.first");
  const { img } = await loadImageFile(file);
  const m = $("mask-canvas");
  const tmp = document.createElement("canvas");
  tmp.width = m.width;
  tmp.height = m.height;
  const t = tmp.getContext("2d");
  t.drawImage(img, 0, 0, m.width, m.height);
  const d = t.getImageData(0, 0, m.width, m.height);
  for (let i = 0; i < d.data.length; i += 4) {
    const [r, g, b, a] = [d.data[i], d.data[i + 1], d.data[i + 2], d.data[i + 3]];
    d.data[i] = d.data[i + 1] = d.data[i + 2] = 255;
    d.data[i + 3] = Math.round((0.299 * r + 0.587 * g + 0.114 * b) * a / 255);
  }
  m.getContext("2d").putImageData(d, 0, 0);
}

function maskIsEmpty() {
  const m = $("mask-canvas");
  const d = m.getContext("2d").getImageData(0, 0, m.width, m.height).data;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return false;
  return true;
}

function maskDataUrl() {
  // White strokes on black, at the image's own size: what the API's `mask` means.
  const m = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = m.width;
  out.height = m.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(m, 0, 0);
  return out.toDataURL("image/png");
}

function setupDropzone(zone, input, onFile) {
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    const file = ev.dataTransfer.files[0];
    if (file) onFile(file);
  });
  input.addEventListener("change", () => { if (input.files[0]) onFile(input.files[0]); });
}

// -- generation ------------------------------------------------------------------------------------

function buildPayload(mode) {
  const problems = [];
  const n = (id) => readField(id, problems);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: n("steps"),
    cfg_scale: n("cfg"),
    width: n("width"),
    height: n("height"),
    n_iter: n("n-iter"),
    batch_size: n("batch-size"),
    seed: n("seed"),
    // The web UI's options, per request; "Default" leaves the schedule to the model's file.
    override_settings: { sd_noise_schedule: $("noise-schedule").value, CLIP_stop_at_last_layers: n("clip-skip") },
  };
  const styles = selectedStyles();
  if (styles.length) body.styles = styles;
  if ($("seed-extras").checked) {
    body.subseed = n("subseed");
    body.subseed_strength = n("subseed-strength");
  }
  if (mode !== "txt2img") {
    body.denoising_strength = n("denoising");
    body.resize_mode = Number($("resize-mode").value);
  }
  if (mode === "txt2img" && $("enable-hr").checked) {
    body.enable_hr = true;
    body.hr_scale = n("hr-scale");
    body.hr_upscaler = $("hr-upscaler").value;
    body.hr_second_pass_steps = n("hr-steps");
    body.denoising_strength = n("hr-denoising");
  }
  if (mode === "inpaint") {
    body.mask_blur = n("mask-blur");
    body.inpainting_mask_invert = Number($("mask-mode").value);
    body.inpainting_fill = Number($("inpainting-fill").value);
    body.inpaint_full_res = $("inpaint-area").value === "masked";
    body.inpaint_full_res_padding = n("padding");
  }
  if (problems.length) throw new FieldErrors(problems);
  if (mode !== "txt2img") {
    if (!ui.initImage) throw pageError("err.image.first");
    body.init_images = [$("image-canvas").toDataURL("image/png")];
  }
  if (mode === "inpaint") {
    if (body.inpainting_mask_invert === 0 && maskIsEmpty()) {
      throw pageError("err.paint.first");
    }
    body.mask = maskDataUrl();
  }
  return body;
}

function setBusy(busy) {
  ui.busy = busy;
  const b = $("generate");
  b.textContent = t(busy ? "interrupt" : "generate");
  b.classList.toggle("interrupt", busy);
  $("skip").hidden = !busy;
  $("progress").hidden = !busy;
  if (!busy) { $("progress-fill").style.width = "0"; $("preview").hidden = true; }
}

async function pollProgress() {
  while (ui.busy) {
    try {
      const p = await api("/progress");
      if (!ui.busy) break;
      $("progress-fill").style.width = `${Math.round(p.progress * 100)}%`;
      const s = p.state || {};
      const eta = p.eta_relative > 0 ? t("progress.eta", { s: p.eta_relative.toFixed(1) }) : "";
      const queued = s.queued ? t("progress.queued", { n: s.queued }) : "";
      $("progress-text").textContent = s.job
        ? t("progress", { pct: Math.round(p.progress * 100), job: s.job_no + 1, jobs: s.job_count,
                          step: s.sampling_step, steps: s.sampling_steps, eta, queued })
        : t("progress.waiting", { queued });
      if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
    } catch (e) { /* progress is best effort */ }
    await new Promise((r) => setTimeout(r, 400));
  }
}

async function generate() {
  if (ui.busy) { await api("/interrupt", { body: {} }).catch(showError); return; }
  if (!GENERATE_TABS.includes(ui.mode)) return;
  showError(null);
  clearFields();
  const mode = ui.mode;
  let body;
  try { body = buildPayload(mode); } catch (e) { showError(e); return; }
  setBusy(true);
  pollProgress();
  try {
    const res = await api(mode === "txt2img" ? "/txt2img" : "/img2img", { body });
    const info = JSON.parse(res.info);
    // The results belong to the tab that asked, even if the user has moved to another meanwhile.
    ui.results[mode] = {
      images: res.images, infotexts: info.infotexts || [], seeds: info.all_seeds || [],
      subseeds: info.all_subseeds || [], subseedStrength: info.subseed_strength || 0, selected: 0,
    };
    if (ui.mode === mode) showResults();
    if (info.notes && info.notes.length) showError(pageError("note", { text: info.notes.join("; ") }));
  } catch (e) {
    showError(e);
  } finally {
    setBusy(false);
  }
}

// -- results --------------------------------------------------------------------------------------

const pngUrl = (b64) => "data:image/png;base64," + b64;

// "Interrupted at step: 10/20" in an infotext: the image is the state after step 10.
function stoppedAt(infotext) {
  const m = /(?:^|, )Interrupted at step: (\d+)\/(\d+)/m.exec(infotext || "");
  return m ? { done: Number(m[1]), total: Number(m[2]) } : null;
}

function currentResult() { return ui.results[ui.mode] || emptyResult(); }

function showResults() {
  const r = currentResult();
  const g = $("gallery");
  g.innerHTML = "";
  r.images.forEach((b64, i) => {
    const wrap = document.createElement("div");
    wrap.className = "thumb";
    const img = document.createElement("img");
    img.src = pngUrl(b64);
    img.alt = t("result.n", { n: i + 1 });
    img.dataset.index = i;
    img.onclick = () => selectImage(i);
    img.ondblclick = () => showLightbox(i);
    wrap.appendChild(img);
    if (stoppedAt(r.infotexts[i])) {
      wrap.classList.add("interrupted");
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.dataset.i18n = "badge.interrupted";
      badge.textContent = t("badge.interrupted");
      wrap.appendChild(badge);
    }
    g.appendChild(wrap);
  });
  selectImage(Math.min(r.selected, Math.max(r.images.length - 1, 0)));
}

function downloadName(r, i) {
  const seed = r.seeds[i] ?? "image";
  return r.subseedStrength && r.subseeds[i] !== undefined ? `sdlab-${seed}-${r.subseeds[i]}.png` : `sdlab-${seed}.png`;
}

function setDownload(a, r, i) {
  if (r.images[i] === undefined) {
    a.removeAttribute("href");
    a.setAttribute("aria-disabled", "true");
    return;
  }
  a.href = pngUrl(r.images[i]);
  a.download = downloadName(r, i);
  a.setAttribute("aria-disabled", "false");
}

function markSmall(img) {
  // Small images (the demo model's 64 px) are scaled up with hard pixels, not blurred.
  const mark = () => img.classList.toggle("small", img.naturalWidth > 0 && img.naturalWidth < 256);
  if (img.complete) mark(); else img.onload = mark;
}

function selectImage(i) {
  const r = currentResult();
  r.selected = i;
  document.querySelectorAll("#gallery img").forEach((el, j) => el.classList.toggle("selected", j === i));
  const has = r.images[i] !== undefined;
  const view = $("result-image");
  view.hidden = !has;
  $("result-empty").hidden = has;
  if (has) { view.src = pngUrl(r.images[i]); markSmall(view); } else view.removeAttribute("src");
  $("infotext").textContent = r.infotexts[i] || "";
  const stop = has ? stoppedAt(r.infotexts[i]) : null;
  $("result-note").hidden = !stop;
  if (stop) {
    $("result-note").textContent = t("note.interrupted", stop);
  }
  setDownload($("download"), r, i);
  $("send-img2img").disabled = $("send-inpaint").disabled = !has;
  if (ui.lightbox) showLightbox(i);
}

function showLightbox(i) {
  const r = currentResult();
  if (r.images[i] === undefined) return;
  r.selected = i;
  ui.lightbox = true;
  const img = $("lightbox-image");
  img.src = pngUrl(r.images[i]);
  markSmall(img);
  const stop = stoppedAt(r.infotexts[i]);
  $("lightbox-caption").textContent = `${i + 1} / ${r.images.length}` +
    (stop ? t("lightbox.interrupted", stop) : "");
  $("lightbox-prev").disabled = $("lightbox-next").disabled = r.images.length < 2;
  setDownload($("lightbox-download"), r, i);
  $("lightbox").hidden = false;
}

function closeLightbox() {
  ui.lightbox = false;
  $("lightbox").hidden = true;
  selectImage(currentResult().selected);
}

function stepLightbox(delta) {
  const r = currentResult();
  if (!r.images.length) return;
  showLightbox((r.selected + delta + r.images.length) % r.images.length);
}

function sendTo(tab) {
  const r = currentResult();
  if (r.images[r.selected] === undefined) return;
  const copy = new Image();
  copy.onload = () => { setInitImage(copy); setTab(tab); };
  copy.src = pngUrl(r.images[r.selected]);
}

function reuseSeed(id, key) {
  const r = currentResult();
  const seeds = r[key];
  if (seeds.length) $(id).value = seeds[r.selected] ?? seeds[0];
  clearField(id);
}

// -- PNG Info --------------------------------------------------------------------------------------

// Keys the API's parser adds for its own use, not in the infotext itself.
const DERIVED_KEYS = new Set(["Size-1", "Size-2"]);

async function readPngInfo(file) {
  showError(null);
  try {
    const { dataUrl } = await loadImageFile(file);
    $("png-image").src = dataUrl;
    $("png-image").hidden = false;
    $("dropzone-png").querySelector(".hint").hidden = true;
    const res = await api("/png-info", { body: { image: dataUrl } });
    $("png-text").textContent = res.info || t("png.none");
    if (res.info) delete $("png-text").dataset.i18n; else $("png-text").dataset.i18n = "png.none";
    const table = $("png-table");
    table.innerHTML = "";
    for (const [k, v] of Object.entries(res.parameters || {})) {
      if (DERIVED_KEYS.has(k)) continue;
      const tr = table.insertRow();
      tr.insertCell().textContent = k;
      tr.insertCell().textContent = v;
    }
    ui.pngParams = res.info ? res.parameters : null;
    $("png-send").disabled = !ui.pngParams;
  } catch (e) {
    delete $("png-text").dataset.i18n;
    $("png-text").textContent = String(e.message || e);
  }
}

function sendParamsToTxt2img() {
  const p = ui.pngParams;
  if (!p) return;
  const set = (id, key) => { if (p[key] !== undefined && p[key] !== "") { $(id).value = p[key]; clearField(id); } };
  $("prompt").value = p["Prompt"] ?? "";
  $("negative").value = p["Negative prompt"] ?? "";
  set("steps", "Steps");
  set("cfg", "CFG scale");
  set("seed", "Seed");
  const size = /^(\d+)x(\d+)$/.exec(p["Size"] || "");
  if (size) setSize(size[1], size[2]);
  $("clip-skip").value = p["Clip skip"] || 1;
  const variation = p["Variation seed strength"] !== undefined;
  $("seed-extras").checked = variation;
  $("variation-row").hidden = !variation;
  if (variation) { set("subseed", "Variation seed"); set("subseed-strength", "Variation seed strength"); }
  if (p["Sampler"]) $("sampler").value = p["Sampler"];
  if (p["Schedule type"]) $("scheduler").value = p["Schedule type"];
  const hires = p["Hires upscale"] !== undefined || p["Hires upscaler"] !== undefined;
  $("enable-hr").checked = hires;
  $("hires-fields").hidden = !hires;
  if (hires) {
    set("hr-scale", "Hires upscale");
    set("hr-steps", "Hires steps");
    set("hr-denoising", "Denoising strength");
    if (p["Hires upscaler"]) $("hr-upscaler").value = p["Hires upscaler"];
  }
  updateHiresSize();
  $("noise-schedule").value = p["Noise Schedule"] === "Zero Terminal SNR" ? "Zero Terminal SNR" : "Default";
  setTab("txt2img");
  updateSizeHint();
}

// -- Settings --------------------------------------------------------------------------------------

// The options sdlab acts on, as the web UI's Settings page names them; any other option the
// server lists is shown read-only. Each one's label is "opt.<key>" in the translation table,
// its help "opt.<key>.help", its choices "choice.<value>" (where the table has them).
const OPTION_UI = {
  CLIP_stop_at_last_layers: { min: 1, max: 12 },
  randn_source: { choices: ["GPU", "CPU", "NV"] },
  sd_noise_schedule: { choices: ["Default", "Zero Terminal SNR"] },
  fp8_storage: { choices: ["Disable", "Enable for SDXL", "Enable"] },
};

// A text node that follows the language: `key` of the table, or `fallback` where it has none.
function i18nSpan(key, fallback, className) {
  const span = document.createElement("span");
  if (className) span.className = className;
  if (I18N.en[key] !== undefined) { span.dataset.i18n = key; span.textContent = t(key); }
  else span.textContent = fallback;
  return span;
}

async function loadSettings() {
  settingsStatus("", false);
  let options;
  try { options = await api("/options"); } catch (e) { settingsStatus(e, true); return; }
  ui.options = options;
  const form = $("settings-form");
  form.innerHTML = "";
  const keys = [...Object.keys(OPTION_UI).filter((k) => k in options),
                ...Object.keys(options).filter((k) => !(k in OPTION_UI))];
  for (const key of keys) {
    const spec = OPTION_UI[key];
    const label = document.createElement("label");
    label.title = key;
    label.append(i18nSpan("opt." + key, key));
    if (!spec) {
      const v = document.createElement("span");
      v.className = "readonly";
      v.textContent = options[key] === null ? "—" : typeof options[key] === "object" ? JSON.stringify(options[key]) : String(options[key]);
      label.append(v);
    } else {
      let input;
      if (spec.choices) {
        input = document.createElement("select");
        fillSelect(input, spec.choices.map((c) => ({ value: c, label: tOr("choice." + c, c) })), String(options[key]));
        for (const opt of input.options) if (I18N.en["choice." + opt.value]) opt.dataset.i18n = "choice." + opt.value;
      } else {
        input = document.createElement("input");
        input.type = "number";
        input.min = spec.min;
        input.max = spec.max;
        input.value = options[key];
      }
      input.id = "opt-" + key;
      input.dataset.key = key;
      label.append(input);
      label.append(i18nSpan("opt." + key + ".help", "", "muted"));
    }
    form.appendChild(label);
  }
}

// `what`: text, an Error, or a function giving the text in the current language (said again on a switch).
function settingsStatus(what, isError) {
  ui.settingsStatus = [what, isError];
  const s = $("settings-status");
  s.textContent = typeof what === "function" ? what() : what && what.render ? what.render()
    : String((what && what.message) || what || "");
  s.className = isError ? "field-error" : "muted";
}

async function applySettings() {
  const changed = {};
  for (const input of document.querySelectorAll("#settings-form [data-key]")) {
    const key = input.dataset.key;
    let value = input.value;
    if (input.type === "number") {
      const spec = OPTION_UI[key];
      if (!/^\d+$/.test(value.trim()) || Number(value) < spec.min || Number(value) > spec.max) {
        settingsStatus(() => t("settings.range", { label: t("opt." + key), min: spec.min, max: spec.max }), true);
        input.classList.add("invalid");
        input.focus();
        return;
      }
      input.classList.remove("invalid");
      value = Number(value);
    }
    if (String(value) !== String(ui.options[key])) changed[key] = value;
  }
  if (!Object.keys(changed).length) { settingsStatus(() => t("settings.unchanged"), false); return; }
  const names = () => Object.keys(changed).map((k) => t("opt." + k)).join(t("settings.names.sep"));
  $("settings-apply").disabled = true;
  const applying = "fp8_storage" in changed ? "settings.applying.reload" : "settings.applying";
  settingsStatus(() => t(applying), false);
  try {
    await api("/options", { body: changed });
    const options = await loadModels();
    syncFormFromOptions(options);
    await loadSettings();
    settingsStatus(() => t("settings.applied", { names: names() }), false);
  } catch (e) {
    settingsStatus(e, true);
  } finally {
    $("settings-apply").disabled = false;
  }
}

// -- language --------------------------------------------------------------------------------------

// The table's words are put back by applyTranslations (i18n.js); what the page wrote itself is
// written again here.
function switchLanguage(lang) {
  setLanguage(lang, true);
  $("lang").value = currentLang;
  $("generate").textContent = t(ui.busy ? "interrupt" : "generate");
  renderModelStatus();
  updateSizeHint();
  updateStylesCount();
  updateHiresSize();
  for (const label of document.querySelectorAll("#styles-list label")) label.title = styleTitle(label);
  if (Object.keys(ui.embeddings).length) fillEmbeddings();
  if (GENERATE_TABS.includes(ui.mode)) showResults();
  if (ui.error) showError(ui.error, false);
  if (ui.settingsStatus) settingsStatus(...ui.settingsStatus);
}

// -- wiring ------------------------------------------------------------------------------------------

function init() {
  applyTranslations();
  $("lang").value = currentLang;
  $("lang").onchange = () => switchLanguage($("lang").value);
  $("generate").textContent = t("generate");
  for (const b of document.querySelectorAll("#tabs button")) b.onclick = () => setTab(b.dataset.tab);
  $("generate").onclick = generate;
  $("skip").onclick = () => api("/skip", { body: {} }).catch(showError);
  for (const id of ["prompt", "negative"]) {
    $(id).addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) generate(); });
  }
  $("model").onchange = () => setModelOption({ sd_model_checkpoint: $("model").value }).catch(() => {});
  $("refresh-models").onclick = async () => {
    await api("/refresh-checkpoints", { body: {} }).catch(showError);
    await loadModels().catch(showError);
    await Promise.all([loadNetworks(), loadStyles()]);
  };
  $("lora-insert").onclick = () => { if ($("lora").value) insertAtCursor(`<lora:${$("lora").value}:1>`); };
  $("embedding-insert").onclick = () => { if ($("embedding").value) insertAtCursor($("embedding").value); };
  $("seed-random").onclick = () => { $("seed").value = -1; clearField("seed"); };
  $("seed-reuse").onclick = () => reuseSeed("seed", "seeds");
  $("subseed-random").onclick = () => { $("subseed").value = -1; clearField("subseed"); };
  $("subseed-reuse").onclick = () => reuseSeed("subseed", "subseeds");
  $("seed-extras").onchange = () => { $("variation-row").hidden = !$("seed-extras").checked; };
  $("enable-hr").onchange = () => { $("hires-fields").hidden = !$("enable-hr").checked; updateHiresSize(); };
  for (const id of ["width", "height", "hr-scale"]) $(id).addEventListener("input", updateHiresSize);
  for (const id of Object.keys(FIELDS)) $(id).addEventListener("input", () => clearField(id));
  for (const id of ["width", "height"]) $(id).addEventListener("input", updateSizeHint);
  $("size-native").onclick = () => { const n = ui.model.native_size; setSize(n, n); updateSizeHint(); };
  $("denoising").addEventListener("input", () => { $("denoising").dataset.touched = "1"; });
  $("result-image").onclick = () => showLightbox(currentResult().selected);
  $("lightbox-image").onclick = closeLightbox;
  $("lightbox").onclick = (ev) => { if (ev.target === $("lightbox")) closeLightbox(); };
  $("lightbox-close").onclick = closeLightbox;
  $("lightbox-prev").onclick = () => stepLightbox(-1);
  $("lightbox-next").onclick = () => stepLightbox(1);
  document.addEventListener("keydown", (ev) => {
    if (!ui.lightbox) return;
    if (ev.key === "Escape") closeLightbox();
    else if (ev.key === "ArrowLeft") stepLightbox(-1);
    else if (ev.key === "ArrowRight") stepLightbox(1);
  });
  $("send-img2img").onclick = () => sendTo("img2img");
  $("send-inpaint").onclick = () => sendTo("inpaint");
  $("png-send").onclick = sendParamsToTxt2img;
  $("settings-apply").onclick = applySettings;
  $("settings-reload").onclick = loadSettings;
  setupDropzone($("dropzone-init"), $("init-file"), async (f) => {
    try { setInitImage((await loadImageFile(f)).img); } catch (e) { showError(e); }
  });
  $("mask-file").addEventListener("change", async () => {
    const f = $("mask-file").files[0];
    $("mask-file").value = "";
    if (f) { try { await uploadMask(f); showError(null); } catch (e) { showError(e); } }
  });
  setupDropzone($("dropzone-png"), $("png-file"), readPngInfo);
  setupBrush();
  const models = loadModels().then((options) => { syncFormFromOptions(options); return loadModelInfo(true); });
  Promise.all([models, loadLists(), loadNetworks(), loadStyles()]).catch(showError);
}

init();
