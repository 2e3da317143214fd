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
  mode: "txt2img",          // txt2img | img2img | inpaint | extras | pnginfo | merge | settings
  busy: false,
  // Each generating tab keeps its own results: txt2img never shows the last inpaint.
  results: Object.fromEntries(GENERATE_TABS.map((t) => [t, emptyResult()])),
  initImage: null,          // HTMLImageElement loaded into the img2img / inpaint canvas
  pngParams: null,          // parsed parameters from the PNG Info tab
  model: null,              // /sdlab/v1/model-info of the selected checkpoint
  options: {},              // GET /options, as last read
  lightbox: false,
  embeddings: {},           // GET /embeddings' loaded ones
  errors: {},               // each error box's (by id) error, said again on a language switch
  settingsStatus: null,     // [what, isError] of the Settings tab's status line
  modelLoading: false,      // a checkpoint is being loaded
  extras: { image: null, busy: false, result: null },  // the Extras tab: its image (data URL), its result
  merge: { busy: false, status: null, result: null },  // the Merger tab: [key, vars] of its status, its answer
  control: { image: null, modules: {}, status: null }, // the ControlNet panel: image (data URL), module sliders
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
  "sd3-shift": { label: "sd3.shift", api: "shift", min: 0.01 },
  "slg-scale": { label: "sd3.slg_scale", api: "slg_scale" },
  "slg-start": { label: "sd3.slg_start", api: "slg_start", min: 0, max: 1 },
  "slg-end": { label: "sd3.slg_end", api: "slg_end", min: 0, max: 1 },
  "xyz-margin": { label: "xyz.margin", integer: true, min: 0, max: 500 },
  "cn-weight": { label: "cn.weight", min: 0, max: 2 },
  "cn-start": { label: "cn.start", min: 0, max: 1 },
  "cn-end": { label: "cn.end", min: 0, max: 1 },
  "cn-res": { label: "cn.slider.Resolution", integer: true, min: 64, max: 2048 },
  "cn-a": { label: "cn.threshold_a" },    // label and range: the preprocessor's (setSliders)
  "cn-b": { label: "cn.threshold_b" },
  "extras-scale": { label: "extras.scale", api: "upscaling_resize", min: 1, max: 8 },
  "extras-width": { label: "width", api: "upscaling_resize_w", integer: true, min: 1, max: 8192 },
  "extras-height": { label: "height", api: "upscaling_resize_h", integer: true, min: 1, max: 8192 },
  "extras-visibility": { label: "extras.visibility", api: "extras_upscaler_2_visibility", min: 0, max: 1 },
  "merge-multiplier": { label: "merge.multiplier", api: "multiplier", min: 0, max: 1 },
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

// A problem of one field: the field's name and what is wrong, in the current language. `nameKey`:
// the key of the field's name where it is not in FIELDS.
const fieldProblem = (id, problemKey, vars, nameKey) =>
  ({ id, render: () => t("err.field", { name: t(nameKey || FIELDS[id].label), problem: t(problemKey, vars) }) });

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

// Every field marked under `root` (a tab's view) back to unmarked.
function clearFields(root = $("generate-view")) {
  for (const el of root.querySelectorAll(".invalid")) clearField(el.id);
}

function focusFirst(problems) { if (problems.length && $(problems[0].id)) $(problems[0].id).focus(); }

// -- HTTP -------------------------------------------------------------------------------

async function api(path, options = {}) {
  const url = path.startsWith("/sdlab/") || path.startsWith("/controlnet/") ? path : API + path;
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

// The error box of the tab on screen (or `boxId`'s): an Error, a PageError (said again in the new
// language on a switch), or text.
const ERROR_BOXES = { extras: "extras-error", merge: "merge-error" };

function showError(err, focus = true, boxId = ERROR_BOXES[ui.mode] || "error") {
  const box = $(boxId);
  if (err) ui.errors[boxId] = err; else delete ui.errors[boxId];
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
  fillMergeModels(items);
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
  const extras = upscalers.map((u) => ({ value: u.name, label: u.name }));
  fillSelect($("extras-upscaler-1"), extras, $("extras-upscaler-1").value || "Lanczos");
  fillSelect($("extras-upscaler-2"), extras, $("extras-upscaler-2").value || "None");
  for (const id of ["extras-upscaler-1", "extras-upscaler-2"]) {  // "None" is a word of the page
    const none = [...$(id).options].find((o) => o.value === "None");
    if (none) { none.dataset.i18n = "none"; none.textContent = t("none"); }
  }
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
  $("sd3-box").hidden = !isSd3();
  if (n && initial) setSize(n, n);
  else if (n && before && before.native_size && before.native_size !== n) followSize(n);
  updateSizeHint();
}

// SD3 / SD3.5 (sd3, sd3.5-large, sd3.5-medium): flow models, with a shift and skip-layer guidance.
const isSd3 = () => Boolean(ui.model && ui.model.family && ui.model.family.startsWith("sd3"));

// The skip-layer guidance layers typed as "7,8,9" (spaces allowed); [] when empty (off).
function slgLayers(problems) {
  const raw = $("slg-layers").value.replace(/\s+/g, "");
  if (raw === "") return [];
  if (!/^\d+(,\d+)*$/.test(raw)) {
    problems.push(fieldProblem("slg-layers", "err.slg.layers", null, "sd3.slg_layers"));
    return [];
  }
  return raw.split(",").map(Number);
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
  $("extras-view").hidden = tab !== "extras";
  $("merge-view").hidden = tab !== "merge";
  $("settings-view").hidden = tab !== "settings";
  if (tab === "inpaint" && $("denoising").dataset.touched !== "1") $("denoising").value = "1";
  if (tab === "img2img" && $("denoising").dataset.touched !== "1") $("denoising").value = "0.75";
  if (tab === "inpaint") sizeMaskCanvas();
  if (GENERATE_TABS.includes(tab)) showResults();
  if (tab === "settings") loadSettings();
  if (tab === "merge") loadVaes();
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
  // SD3's fields go only to an SD3 model (other families refuse them); an empty shift is the model's own.
  if (isSd3()) {
    if ($("sd3-shift").value.trim() !== "") body.shift = n("sd3-shift");
    const layers = slgLayers(problems);
    if (layers.length) {
      body.slg_layers = layers;
      body.slg_scale = n("slg-scale");
      body.slg_start = n("slg-start");
      body.slg_end = n("slg-end");
    }
  }
  if (mode === "inpaint") {
    body.mask_blur = n("mask-blur");
    body.inpainting_mask_invert = Number($("mask-mode").value);
    body.inpainting_fill = Number($("inpainting-fill").value);
    body.inpaint_full_res = $("inpaint-area").value === "masked";
    body.inpaint_full_res_padding = n("padding");
  }
  if (mode === "txt2img" && $("script").value === "x/y/z plot") {
    body.script_name = "x/y/z plot";
    body.script_args = xyzScriptArgs(problems);
  }
  const unit = controlUnit(problems);
  if (unit) body.alwayson_scripts = { controlnet: { args: [unit] } };
  if (problems.length) throw new FieldErrors(problems);
  // in img2img a unit without an image takes the init image, as the extension's
  if (unit && !unit.image && mode === "txt2img") throw pageError("err.cn.image");
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
  showError(null, true, "error");
  clearFields();
  const mode = ui.mode;
  let body;
  try { body = buildPayload(mode); } catch (e) { showError(e, true, "error"); return; }
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
    if (info.notes && info.notes.length) showError(pageError("note", { text: info.notes.join("; ") }), true, "error");
  } catch (e) {
    showError(xyzFieldError(e), true, "error");
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

// -- X/Y/Z plot: txt2img's Script -------------------------------------------------------------------

// The axes sdlab's X/Y/Z plot takes, each with its index in the web UI 1.10 txt2img list (the API's
// x_type): recipes/xyz.py's AXIS_OPTIONS, which tests/server/test_page_panels.py checks this list
// against. `choices`: where the values are picked from (a select of the page, "styles", or the
// values themselves); they are sent as the axis' dropdown list, as the web UI's page sends them.
const XYZ_AXES = [
  { index: 0, name: "Nothing" },
  { index: 1, name: "Seed" },
  { index: 2, name: "Var. seed" },
  { index: 3, name: "Var. strength" },
  { index: 4, name: "Steps" },
  { index: 5, name: "Hires steps" },
  { index: 6, name: "CFG Scale" },
  { index: 7, name: "Prompt S/R" },
  { index: 8, name: "Prompt order" },
  { index: 9, name: "Sampler", choices: "sampler" },
  { index: 10, name: "Hires sampler", choices: "sampler" },
  { index: 11, name: "Checkpoint name", choices: "model" },
  { index: 17, name: "Schedule type", choices: "scheduler" },
  { index: 23, name: "Eta" },
  { index: 24, name: "Clip skip" },
  { index: 25, name: "Denoising" },
  { index: 28, name: "Hires upscaler", choices: "hr-upscaler" },
  { index: 30, name: "Styles", choices: "styles" },
  { index: 39, name: "RNG source", choices: ["GPU", "CPU", "NV"] },
  { index: 41, name: "Size" },
];
const XYZ_START = { x: 1, y: 0, z: 0 };  // the web UI's: Seed, Nothing, Nothing

function setupXyz() {
  for (const axis of "xyz") {
    const select = $(`xyz-${axis}-type`);
    fillSelect(select, XYZ_AXES.map((a) => ({ value: a.index, label: t("xyz.axis." + a.name) })), XYZ_START[axis]);
    [...select.options].forEach((opt, i) => { opt.dataset.i18n = "xyz.axis." + XYZ_AXES[i].name; });
    select.onchange = () => { clearField(select.id); updateXyzAxis(axis); };
    $(`xyz-${axis}-values`).addEventListener("input", () => clearField(`xyz-${axis}-values`));
    updateXyzAxis(axis);
  }
  $("script").onchange = () => { $("xyz-fields").hidden = $("script").value !== "x/y/z plot"; };
}

const xyzAxisOf = (axis) => XYZ_AXES.find((a) => String(a.index) === $(`xyz-${axis}-type`).value) || XYZ_AXES[0];

// [value, label] of each value an axis with choices offers: the page's own lists.
function xyzChoices(spec) {
  if (Array.isArray(spec.choices)) return spec.choices.map((c) => [c, c]);
  if (spec.choices === "styles") return [...document.querySelectorAll("#styles-list input")].map((b) => [b.value, b.value]);
  return [...$(spec.choices).options].map((o) => [o.value, o.textContent]);
}

// An axis' type chosen: a text box for values typed, a box for each choice for values picked.
function updateXyzAxis(axis) {
  const spec = xyzAxisOf(axis);
  const box = $(`xyz-${axis}-choices`);
  $(`xyz-${axis}-values`).closest("label").hidden = !spec.index || Boolean(spec.choices);
  box.hidden = !spec.choices;
  if (!spec.choices) return;
  const on = new Set([...box.querySelectorAll("input:checked")].map((b) => b.value));
  box.innerHTML = "";
  for (const [value, label] of xyzChoices(spec)) {
    const item = document.createElement("label");
    const check = document.createElement("input");
    check.type = "checkbox";
    check.value = value;
    check.checked = on.has(value);
    check.onchange = () => clearField(`xyz-${axis}-type`);
    item.append(check, " " + label);
    box.appendChild(item);
  }
}

// Web UI 1.10's 18 positional script_args of "x/y/z plot".
function xyzScriptArgs(problems) {
  const axes = [];
  for (const axis of "xyz") {
    const spec = xyzAxisOf(axis);
    if (!spec.index) { axes.push(0, "", null); continue; }
    if (spec.choices) {
      const picked = [...document.querySelectorAll(`#xyz-${axis}-choices input:checked`)].map((b) => b.value);
      if (!picked.length) problems.push(fieldProblem(`xyz-${axis}-type`, "err.xyz.pick", null, `xyz.${axis}.values`));
      axes.push(spec.index, "", picked);
    } else {
      const text = $(`xyz-${axis}-values`).value.trim();
      if (!text) problems.push(fieldProblem(`xyz-${axis}-values`, "err.xyz.values", null, `xyz.${axis}.values`));
      axes.push(spec.index, text, null);
    }
  }
  const margin = readField("xyz-margin", problems);
  // draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, margin_size, csv_mode
  return [...axes, $("xyz-legend").checked, $("xyz-cells").checked, $("xyz-subgrids").checked,
          $("xyz-keep-seeds").checked, false, false, false, margin, false];
}

// The server's "x/y/z plot: X values (Steps): ..." shown on that axis' values too.
function xyzFieldError(err) {
  const found = /^x\/y\/z plot: ([XYZ]) values\b/.exec(String((err && err.message) || ""));
  if (!found || err.fields) return err;
  const axis = found[1].toLowerCase();
  const id = xyzAxisOf(axis).choices ? `xyz-${axis}-type` : `xyz-${axis}-values`;
  const text = err.message;
  return new FieldErrors([{ id, render: () => text }]);
}

// -- ControlNet: one unit of sd-webui-controlnet's, on the generating tabs ---------------------------

async function loadControlNet() {
  const [modules, models] = await Promise.all([api("/controlnet/module_list").catch(() => null),
                                               api("/controlnet/model_list").catch(() => null)]);
  if (modules) {
    ui.control.modules = modules.module_detail || {};
    fillSelect($("cn-module"), modules.module_list.map((m) => ({ value: m, label: m })), $("cn-module").value || "none");
    setSliders();
  }
  if (models) {
    const list = models.model_list || [];
    const current = list.includes($("cn-model").value) ? $("cn-model").value : undefined;
    if (list.length) fillSelect($("cn-model"), list.map((m) => ({ value: m, label: m })), current);
    else {
      fillSelect($("cn-model"), [{ value: "", label: t("none.in.folder") }]);
      $("cn-model").options[0].dataset.i18n = "none.in.folder";
    }
  }
}

// The preprocessor's sliders, as the extension shows them: its resolution, and up to two
// thresholds under the extension's names.
function setSliders() {
  const sliders = (ui.control.modules[$("cn-module").value] || {}).sliders || [];
  const res = sliders.find((s) => s.name === "Resolution");
  const rest = sliders.filter((s) => s !== res);
  $("cn-res-box").hidden = !res;
  if (res) setSlider("cn-res", res);
  ["cn-a", "cn-b"].forEach((id, i) => {
    const s = rest[i];
    $(id + "-box").hidden = !s;
    if (!s) return;
    FIELDS[id].label = I18N.en["cn.slider." + s.name] !== undefined ? "cn.slider." + s.name : FIELDS[id].label;
    $(id + "-name").dataset.i18n = FIELDS[id].label;
    $(id + "-name").textContent = t(FIELDS[id].label);
    setSlider(id, s);
  });
}

function setSlider(id, s) {
  const el = $(id);
  Object.assign(el, { min: s.min, max: s.max, step: s.step, value: s.value });
  Object.assign(FIELDS[id], { min: s.min, max: s.max });
  clearField(id);
}

// The sliders' values for the API: -1 (the preprocessor's default) for those it does not have.
function sliderValues(problems) {
  const value = (id) => ($(id + "-box").hidden || $(id).disabled ? -1 : readField(id, problems));
  return { processor_res: value("cn-res"), threshold_a: value("cn-a"), threshold_b: value("cn-b") };
}

// The unit for alwayson_scripts.controlnet.args, or null when it is off.
function controlUnit(problems) {
  if (!$("cn-enable").checked) return null;
  const before = problems.length;
  const n = (id) => readField(id, problems);
  const unit = {
    enabled: true, module: $("cn-module").value, model: $("cn-model").value, weight: n("cn-weight"),
    guidance_start: n("cn-start"), guidance_end: n("cn-end"), control_mode: $("cn-control-mode").value,
    resize_mode: $("cn-resize-mode").value, pixel_perfect: $("cn-pixel-perfect").checked, ...sliderValues(problems),
  };
  if (!unit.model) problems.push(fieldProblem("cn-model", "err.cn.model", null, "cn.model"));
  if (unit.guidance_start !== null && unit.guidance_end !== null && unit.guidance_end < unit.guidance_start) {
    problems.push(fieldProblem("cn-end", "err.min", { n: unit.guidance_start }));
  }
  if (problems.length > before) $("cn-box").open = true;  // the fields at fault in sight
  if (ui.control.image) unit.image = ui.control.image;
  return unit;
}

async function setControlImage(file) {
  const { img, dataUrl } = await loadImageFile(file);
  ui.control.image = dataUrl;
  ui.control.size = [img.naturalWidth, img.naturalHeight];
  $("cn-image").src = dataUrl;
  $("cn-image").hidden = false;
  $("cn-map").hidden = true;
  $("cn-clear").hidden = false;
  $("dropzone-cn").querySelector(".hint").hidden = true;
  controlStatus(null);
}

function clearControlImage() {
  ui.control.image = null;
  $("cn-image").hidden = $("cn-map").hidden = $("cn-clear").hidden = true;
  $("cn-image").removeAttribute("src");
  $("dropzone-cn").querySelector(".hint").hidden = false;
  controlStatus(null);
}

// The extension's pixel-perfect resolution: the control image's short side scaled as the resize mode
// fits it to the size to generate.
function pixelPerfectRes() {
  const [w, h] = ui.control.size;
  const W = Number($("width").value), H = Number($("height").value);
  const fit = $("cn-resize-mode").value === "Resize and Fill" ? Math.min : Math.max;
  return Math.round(fit(H / h, W / w) * Math.min(w, h));
}

// "Preview the map": the module run on the image by /controlnet/detect, the map shown beside it.
async function previewControl() {
  showError(null, false, "error");
  for (const id of ["cn-res", "cn-a", "cn-b"]) clearField(id);
  const problems = [];
  const values = sliderValues(problems);
  if (problems.length) { showError(new FieldErrors(problems), true, "error"); return; }
  if (!ui.control.image) { showError(pageError("err.cn.image"), true, "error"); return; }
  if ($("cn-pixel-perfect").checked && !$("cn-res-box").hidden) values.processor_res = pixelPerfectRes();
  $("cn-preview").disabled = true;
  controlStatus(["cn.detecting"]);
  try {
    const res = await api("/controlnet/detect", { body: {
      controlnet_module: $("cn-module").value, controlnet_input_images: [ui.control.image],
      controlnet_processor_res: values.processor_res, controlnet_threshold_a: values.threshold_a,
      controlnet_threshold_b: values.threshold_b } });
    const map = $("cn-map");
    await new Promise((resolve, reject) => { map.onload = resolve; map.onerror = reject; map.src = pngUrl(res.images[0]); });
    map.hidden = false;
    controlStatus(["cn.map.size", { w: map.naturalWidth, h: map.naturalHeight }]);
  } catch (e) {
    controlStatus(null);
    showError(e, true, "error");
  } finally {
    $("cn-preview").disabled = false;
  }
}

// `what`: [key, vars] of the panel's status line, or null.
function controlStatus(what) { ui.control.status = what; renderControlStatus(); }
function renderControlStatus() {
  const s = ui.control.status;
  $("cn-status").textContent = s ? t(s[0], s[1]) : "";
}

// -- Extras: upscale one image -----------------------------------------------------------------------

async function setExtrasImage(file) {
  const { img, dataUrl } = await loadImageFile(file);
  ui.extras.image = dataUrl;
  ui.extras.size = [img.naturalWidth, img.naturalHeight];
  $("extras-image").src = dataUrl;
  $("extras-image").hidden = false;
  markSmall($("extras-image"));
  $("dropzone-extras").querySelector(".hint").hidden = true;
  renderExtrasResult();
}

function updateExtrasMode() {
  const to = $("extras-resize-mode").value === "1";
  for (const el of document.querySelectorAll(".extras-to")) el.hidden = !to;
  for (const el of document.querySelectorAll(".extras-by")) el.hidden = to;
}

async function runExtras() {
  if (ui.extras.busy) return;
  showError(null, false, "extras-error");
  clearFields($("extras-view"));
  const problems = [];
  const n = (id) => readField(id, problems);
  const mode = Number($("extras-resize-mode").value);
  const body = { resize_mode: mode, upscaler_1: $("extras-upscaler-1").value, upscaler_2: $("extras-upscaler-2").value,
                 extras_upscaler_2_visibility: n("extras-visibility") };
  if (mode === 0) body.upscaling_resize = n("extras-scale");
  else {
    Object.assign(body, { upscaling_resize_w: n("extras-width"), upscaling_resize_h: n("extras-height"),
                          upscaling_crop: $("extras-crop").checked });
  }
  if (problems.length) { showError(new FieldErrors(problems), true, "extras-error"); return; }
  if (!ui.extras.image) { showError(pageError("err.image.first"), true, "extras-error"); return; }
  body.image = ui.extras.image;
  ui.extras.busy = $("extras-run").disabled = true;
  $("extras-status").hidden = false;
  try {
    const res = await api("/extra-single-image", { body });
    // html_info is the postprocessing text as the web UI's HTML: <p>line<br>\nline</p>
    const info = new DOMParser().parseFromString(res.html_info || "", "text/html").body.textContent.trim();
    const probe = new Image();
    await new Promise((resolve) => { probe.onload = probe.onerror = resolve; probe.src = pngUrl(res.image); });
    ui.extras.result = { image: res.image, info, w: probe.naturalWidth, h: probe.naturalHeight };
    renderExtrasResult();
  } catch (e) {
    showError(e, true, "extras-error");
  } finally {
    ui.extras.busy = $("extras-run").disabled = false;
    $("extras-status").hidden = true;
  }
}

function renderExtrasResult() {
  const size = ui.extras.size;
  $("extras-size").textContent = size ? t("extras.size", { w: size[0], h: size[1] }) : "";
  $("extras-status").textContent = t("extras.running");
  const r = ui.extras.result, img = $("extras-result"), a = $("extras-download");
  img.hidden = !r;
  $("extras-empty").hidden = Boolean(r);
  $("extras-info").textContent = r ? r.info : "";
  $("extras-result-size").textContent = r ? t("extras.size", { w: r.w, h: r.h }) : "";
  if (!r) { img.removeAttribute("src"); a.removeAttribute("href"); a.setAttribute("aria-disabled", "true"); return; }
  const url = pngUrl(r.image);
  if (img.getAttribute("src") !== url) { img.src = url; markSmall(img); }
  a.href = url;
  a.download = "sdlab-extras.png";
  a.setAttribute("aria-disabled", "false");
}

// -- Checkpoint Merger ---------------------------------------------------------------------------------

const MERGE_METHODS = ["Weighted sum", "Add difference", "No interpolation"];

function fillMergeModels(items) {
  const keep = (id, fallback) => (items.some((i) => i.value === $(id).value) ? $(id).value : fallback);
  fillSelect($("merge-a"), items, keep("merge-a", items[0] && items[0].value));
  fillSelect($("merge-b"), items, keep("merge-b", (items[1] || items[0] || {}).value));
  fillSelect($("merge-c"), [{ value: "", label: t("none") }, ...items], keep("merge-c", ""));
  $("merge-c").options[0].dataset.i18n = "none";
  updateMergeForm();
}

async function loadVaes() {
  const vaes = await api("/sd-vae").catch(() => []);
  const items = vaes.map((v) => ({ value: v.model_name, label: v.model_name }));
  fillSelect($("merge-vae"), [{ value: "None", label: t("none") }, ...items],
             items.some((i) => i.value === $("merge-vae").value) ? $("merge-vae").value : "None");
  $("merge-vae").options[0].dataset.i18n = "none";
}

// The method chosen: the models and the multiplier it reads, and its formula.
function updateMergeForm() {
  const i = MERGE_METHODS.indexOf($("merge-method").value);
  $("merge-b").disabled = i === 2;
  $("merge-c").disabled = i !== 1;
  $("merge-multiplier").disabled = i === 2;
  $("merge-formula").textContent = t("merge.formula." + i);
}

async function runMerge() {
  if (ui.merge.busy) return;
  showError(null, false, "merge-error");
  clearFields($("merge-view"));
  const method = $("merge-method").value, i = MERGE_METHODS.indexOf(method);
  const problems = [];
  const body = { primary_model_name: $("merge-a").value, interp_method: method, save_as_half: $("merge-half").checked,
                 custom_name: $("merge-name").value.trim(), bake_in_vae: $("merge-vae").value,
                 discard_weights: $("merge-discard").value };
  if (!body.primary_model_name) problems.push(fieldProblem("merge-a", "err.required", null, "merge.a"));
  if (i !== 2) {
    body.multiplier = readField("merge-multiplier", problems);
    body.secondary_model_name = $("merge-b").value;
    if (!body.secondary_model_name) problems.push(fieldProblem("merge-b", "err.required", null, "merge.b"));
  }
  if (i === 1) {
    body.tertiary_model_name = $("merge-c").value;
    if (!body.tertiary_model_name) problems.push(fieldProblem("merge-c", "err.merge.c", null, "merge.c"));
  }
  if (problems.length) { showError(new FieldErrors(problems), true, "merge-error"); return; }
  ui.merge.busy = $("merge-run").disabled = true;
  ui.merge.result = null;
  const started = Date.now();
  const tick = () => mergeStatus(["merge.running", { s: Math.floor((Date.now() - started) / 1000) }]);
  tick();
  const timer = setInterval(tick, 500);
  try {
    ui.merge.result = await api("/merge", { body });
    clearInterval(timer);
    mergeStatus(null);
    await loadModels().catch((e) => showError(e, true, "merge-error"));  // the new checkpoint in every list
  } catch (e) {
    clearInterval(timer);
    mergeStatus(null);
    showError(e, true, "merge-error");
  } finally {
    ui.merge.busy = $("merge-run").disabled = false;
    renderMergeStatus();
  }
}

// `what`: [key, vars] of the status line beside the button, or null.
function mergeStatus(what) { ui.merge.status = what; renderMergeStatus(); }
function renderMergeStatus() {
  const s = ui.merge.status, r = ui.merge.result;
  $("merge-status").textContent = s ? t(s[0], s[1]) : "";
  $("merge-result").hidden = !r;
  if (r) {
    $("merge-result-name").textContent = r.filename.split(/[\\/]/).pop();
    $("merge-result-name").title = r.filename;
  }
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
  // SD3's keys (infotext "Shift", "SLG layers" ...); without them, the model's shift and no SLG
  $("sd3-shift").value = p["Shift"] ?? "";
  $("slg-layers").value = String(p["SLG layers"] ?? "").replace(/[\[\]() ]/g, "");
  set("slg-scale", "SLG scale");
  set("slg-start", "SLG start");
  set("slg-end", "SLG end");
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
  for (const [boxId, err] of Object.entries(ui.errors)) showError(err, false, boxId);
  renderExtrasResult();
  renderMergeStatus();
  renderControlStatus();
  updateMergeForm();
  for (const axis of "xyz") updateXyzAxis(axis);
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
    await Promise.all([loadNetworks(), loadStyles(), loadControlNet()]);
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
  for (const id of [...Object.keys(FIELDS), "slg-layers"]) $(id).addEventListener("input", () => clearField(id));
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
  setupXyz();
  $("cn-enable").onchange = () => { $("cn-on").hidden = !$("cn-enable").checked; };
  $("cn-module").onchange = () => { setSliders(); $("cn-map").hidden = true; controlStatus(null); };
  $("cn-pixel-perfect").onchange = () => { $("cn-res").disabled = $("cn-pixel-perfect").checked; };
  $("cn-preview").onclick = previewControl;
  $("cn-clear").onclick = clearControlImage;
  setupDropzone($("dropzone-cn"), $("cn-file"), async (f) => {
    try { await setControlImage(f); } catch (e) { showError(e, true, "error"); }
  });
  setupDropzone($("dropzone-extras"), $("extras-file"), async (f) => {
    try { await setExtrasImage(f); showError(null, false, "extras-error"); } catch (e) { showError(e, true, "extras-error"); }
  });
  $("extras-resize-mode").onchange = updateExtrasMode;
  $("extras-run").onclick = runExtras;
  $("merge-method").onchange = updateMergeForm;
  $("merge-run").onclick = runMerge;
  for (const id of ["merge-a", "merge-b", "merge-c", "cn-model"]) $(id).addEventListener("change", () => clearField(id));
  renderExtrasResult();
  const models = loadModels().then((options) => { syncFormFromOptions(options); return loadModelInfo(true); });
  Promise.all([models, loadLists(), loadNetworks(), loadStyles(), loadControlNet()]).catch(showError);
}

init();
