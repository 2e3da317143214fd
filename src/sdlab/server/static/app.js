// sdlab's web page: a plain script over the same /sdapi/v1 API that scripts and plug-ins use.
"use strict";

const API = "/sdapi/v1";
const $ = (id) => document.getElementById(id);

const ui = {
  mode: "txt2img",          // txt2img | img2img | inpaint | pnginfo
  busy: false,
  lastSeeds: [],            // all_seeds of the last result
  lastInfotexts: [],
  selected: 0,              // index of the selected gallery image
  initImage: null,          // HTMLImageElement loaded into the img2img / inpaint canvas
  pngParams: null,          // parsed parameters from the PNG Info tab
};

// -- HTTP -------------------------------------------------------------------------------

async function api(path, options = {}) {
  const init = { method: options.body === undefined ? "GET" : "POST", headers: {} };
  if (options.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  const res = await fetch(API + path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!res.ok) {
    let detail = data && data.detail !== undefined ? data.detail : text;
    if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    throw new Error(`${res.status}: ${detail}`);
  }
  return data;
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = String(err.message || err);
}

// -- lists: models, samplers, schedules, LoRAs ----------------------------------------------

function fillSelect(select, items, current) {
  select.innerHTML = "";
  for (const { value, label } of items) {
    const opt = document.createElement("option");
    opt.value = value;
    opt.textContent = label;
    select.appendChild(opt);
  }
  if (current !== undefined && current !== null) select.value = current;
}

async function loadModels() {
  const [models, options] = await Promise.all([api("/sd-models"), api("/options")]);
  const current = options.sd_model_checkpoint;
  const items = models.map((m) => ({ value: m.title, label: m.title }));
  if (current && !items.some((i) => i.value === current)) items.unshift({ value: current, label: current });
  fillSelect($("model"), items, current);
  $("fp8").value = options.fp8_storage;
}

async function loadLists() {
  const [samplers, schedulers, loras] = await Promise.all([api("/samplers"), api("/schedulers"), api("/loras")]);
  fillSelect($("sampler"), samplers.map((s) => ({ value: s.name, label: s.name })), "Euler a");
  fillSelect($("scheduler"), schedulers.map((s) => ({ value: s.label, label: s.label })), "Automatic");
  if (loras.length) fillSelect($("lora"), loras.map((l) => ({ value: l.name, label: l.alias || l.name })));
}

// Options that load the model (again): the checkpoint, and how its weights are stored.
async function setModelOption(body) {
  $("model").disabled = $("fp8").disabled = true;
  $("model-status").textContent = "loading…";
  try {
    await api("/options", { body });
    $("model-status").textContent = "";
  } catch (e) {
    $("model-status").textContent = "";
    showError(e);
  } finally {
    $("model").disabled = $("fp8").disabled = false;
    await loadModels();
  }
}

function insertLora() {
  const name = $("lora").value;
  if (!name) return;
  const box = $("prompt");
  const tag = `<lora:${name}:1>`;
  const start = box.selectionStart ?? box.value.length;
  const end = box.selectionEnd ?? box.value.length;
  const before = box.value.slice(0, start);
  const sep = before && !/[\s,]$/.test(before) ? ", " : "";
  box.value = before + sep + tag + box.value.slice(end);
  box.focus();
  const pos = (before + sep + tag).length;
  box.setSelectionRange(pos, pos);
}

// -- tabs ---------------------------------------------------------------------------------------

function setTab(tab) {
  ui.mode = tab;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  document.body.className = "mode-" + tab;
  $("generate-view").hidden = tab === "pnginfo";
  $("pnginfo-view").hidden = tab !== "pnginfo";
  if (tab === "inpaint" && $("denoising").dataset.touched !== "1") $("denoising").value = "1";
  if (tab === "img2img" && $("denoising").dataset.touched !== "1") $("denoising").value = "0.75";
  if (tab === "inpaint") sizeMaskCanvas();
}

// -- the init image and the mask brush -------------------------------------------------------

function loadImageFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const img = new Image();
      img.onload = () => resolve({ img, dataUrl: reader.result });
      img.onerror = () => reject(new Error("not an image the browser can read"));
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
  $("width").value = Math.max(64, Math.round(img.naturalWidth / 8) * 8);
  $("height").value = Math.max(64, Math.round(img.naturalHeight / 8) * 8);
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

function num(id) { return Number($(id).value); }

function buildPayload() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: num("steps"),
    cfg_scale: num("cfg"),
    width: num("width"),
    height: num("height"),
    n_iter: num("n-iter"),
    batch_size: num("batch-size"),
    seed: num("seed"),
    // The web UI's option, per request; "Default" leaves it to the model's file (its ztsnr marker).
    override_settings: { sd_noise_schedule: $("noise-schedule").value },
  };
  if (ui.mode === "img2img" || ui.mode === "inpaint") {
    if (!ui.initImage) throw new Error("drop an image into the image box first");
    body.init_images = [$("image-canvas").toDataURL("image/png")];
    body.denoising_strength = num("denoising");
  }
  if (ui.mode === "inpaint") {
    body.mask = maskDataUrl();
    body.mask_blur = num("mask-blur");
    body.inpainting_mask_invert = $("mask-invert").checked ? 1 : 0;
    body.inpaint_full_res = $("only-masked").checked;
    body.inpaint_full_res_padding = num("padding");
    body.inpainting_fill = 1;
  }
  return body;
}

function setBusy(busy) {
  ui.busy = busy;
  const b = $("generate");
  b.textContent = busy ? "Interrupt" : "Generate";
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
      const eta = p.eta_relative > 0 ? `, ETA ${p.eta_relative.toFixed(1)} s` : "";
      const queued = s.queued ? `, ${s.queued} waiting` : "";
      $("progress-text").textContent = s.job
        ? `${Math.round(p.progress * 100)}% — batch ${s.job_no + 1}/${s.job_count}, step ${s.sampling_step}/${s.sampling_steps}${eta}${queued}`
        : `waiting in the queue${queued}`;
      if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
    } catch (e) { /* progress is best effort */ }
    await new Promise((r) => setTimeout(r, 400));
  }
}

async function generate() {
  if (ui.busy) { await api("/interrupt", { body: {} }).catch(showError); return; }
  showError(null);
  let body;
  try { body = buildPayload(); } catch (e) { showError(e); return; }
  const endpoint = ui.mode === "txt2img" ? "/txt2img" : "/img2img";
  setBusy(true);
  pollProgress();
  try {
    const res = await api(endpoint, { body });
    const info = JSON.parse(res.info);
    ui.lastSeeds = info.all_seeds || [];
    ui.lastInfotexts = info.infotexts || [];
    showGallery(res.images);
    if (info.notes && info.notes.length) showError("Note: " + info.notes.join("; "));
  } catch (e) {
    showError(e);
  } finally {
    setBusy(false);
  }
}

function showGallery(images) {
  const g = $("gallery");
  g.innerHTML = "";
  images.forEach((b64, i) => {
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = `result ${i + 1}`;
    img.dataset.index = i;
    img.onclick = () => selectImage(i);
    g.appendChild(img);
  });
  selectImage(0);
  $("send-img2img").disabled = $("send-inpaint").disabled = images.length === 0;
}

function selectImage(i) {
  ui.selected = i;
  document.querySelectorAll("#gallery img").forEach((el, j) => el.classList.toggle("selected", j === i));
  $("infotext").textContent = ui.lastInfotexts[i] || "";
}

function sendTo(tab) {
  const img = document.querySelectorAll("#gallery img")[ui.selected];
  if (!img) return;
  const copy = new Image();
  copy.onload = () => { setInitImage(copy); setTab(tab); };
  copy.src = img.src;
}

// -- PNG Info --------------------------------------------------------------------------------------

async function readPngInfo(file) {
  showError(null);
  try {
    const { dataUrl } = await loadImageFile(file);
    $("png-image").src = dataUrl;
    $("png-image").hidden = false;
    $("dropzone-png").querySelector(".hint").hidden = true;
    const res = await api("/png-info", { body: { image: dataUrl } });
    $("png-text").textContent = res.info || "(no generation parameters in this image)";
    const table = $("png-table");
    table.innerHTML = "";
    for (const [k, v] of Object.entries(res.parameters || {})) {
      const tr = table.insertRow();
      tr.insertCell().textContent = k;
      tr.insertCell().textContent = v;
    }
    ui.pngParams = res.info ? res.parameters : null;
    $("png-send").disabled = !ui.pngParams;
  } catch (e) {
    $("png-text").textContent = String(e.message || e);
  }
}

function sendParamsToTxt2img() {
  const p = ui.pngParams;
  if (!p) return;
  const set = (id, key) => { if (p[key] !== undefined && p[key] !== "") $(id).value = p[key]; };
  set("prompt", "Prompt");
  set("negative", "Negative prompt");
  set("steps", "Steps");
  set("cfg", "CFG scale");
  set("seed", "Seed");
  set("width", "Size-1");
  set("height", "Size-2");
  if (p["Sampler"]) $("sampler").value = p["Sampler"];
  if (p["Schedule type"]) $("scheduler").value = p["Schedule type"];
  $("noise-schedule").value = p["Noise Schedule"] === "Zero Terminal SNR" ? "Zero Terminal SNR" : "Default";
  setTab("txt2img");
}

// -- wiring ------------------------------------------------------------------------------------------

function init() {
  for (const b of document.querySelectorAll("#tabs button")) b.onclick = () => setTab(b.dataset.tab);
  $("generate").onclick = generate;
  $("skip").onclick = () => api("/skip", { body: {} }).catch(showError);
  $("prompt").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) generate(); });
  $("model").onchange = () => setModelOption({ sd_model_checkpoint: $("model").value });
  $("fp8").onchange = () => setModelOption({ fp8_storage: $("fp8").value });
  $("refresh-models").onclick = async () => { await api("/refresh-checkpoints", { body: {} }); await loadModels(); };
  $("lora-insert").onclick = insertLora;
  $("seed-random").onclick = () => { $("seed").value = -1; };
  $("seed-reuse").onclick = () => { if (ui.lastSeeds.length) $("seed").value = ui.lastSeeds[ui.selected] ?? ui.lastSeeds[0]; };
  $("denoising").addEventListener("input", () => { $("denoising").dataset.touched = "1"; });
  $("send-img2img").onclick = () => sendTo("img2img");
  $("send-inpaint").onclick = () => sendTo("inpaint");
  $("png-send").onclick = sendParamsToTxt2img;
  setupDropzone($("dropzone-init"), $("init-file"), async (f) => {
    try { setInitImage((await loadImageFile(f)).img); } catch (e) { showError(e); }
  });
  setupDropzone($("dropzone-png"), $("png-file"), readPngInfo);
  setupBrush();
  Promise.all([loadModels(), loadLists()]).catch(showError);
}

init();
