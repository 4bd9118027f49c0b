// latentcast browser client: one page, one WebSocket, MessagePack frames (PROTOCOL.md v1).
//
// The page follows one job at a time (the "current" job). Generate, and every debounced
// edit in live mode, submits a new job that `replaces` the current one when that is still
// unfinished, so the engine never works on a picture nobody looks at. While the current
// job is unfinished the button reads "Replace", and a replacing job says so in the status.
//
// Hooks for tests and curious people: body[data-conn] is connecting|open|closed;
// #status[data-state] is idle|submitting|queued|running|complete|cancelled|error;
// #preview[data-step] and [data-previews] change each time a preview is drawn;
// #stage.stale with #stage-note marks what a cancelled or failed job left on the stage;
// window.latentcast.latentToRgba is the pure latent decoder.
//
// The session is resumable (PROTOCOL.md section 2a): the page asks for ?resumable=1 and
// keeps the resume token, the last seq it processed and the current job in
// sessionStorage. A dropped connection is taken over again with ?resume=<token>&after=<seq>
// (messages already processed are skipped by seq); a reloaded page resumes with after=0,
// so the server replays what it kept of the current job and the page shows it again.

import { Decoder, Encoder } from "@msgpack/msgpack";

const encoder = new Encoder({ ignoreUndefined: true });
const decoder = new Decoder();

const $ = (id) => document.getElementById(id);
const el = {
  form: $("form"),
  model: $("model"),
  modelField: $("model-field"),
  prompt: $("prompt"),
  negative: $("negative"),
  steps: $("steps"),
  width: $("width"),
  height: $("height"),
  seed: $("seed"),
  scheduler: $("scheduler"),
  guidance: $("guidance"),
  guidanceOut: $("guidance-out"),
  previewKind: $("preview-kind"),
  live: $("live"),
  img2img: $("img2img"),
  useSketch: $("use-sketch"),
  sketchAs: $("sketch-as"),
  strengthField: $("strength-field"),
  controlFields: $("control-fields"),
  controlName: $("control-name"),
  controlInvert: $("control-invert"),
  controlScale: $("control-scale"),
  controlScaleOut: $("control-scale-out"),
  sketch: $("sketch"),
  brushColor: $("brush-color"),
  brushSize: $("brush-size"),
  bgColor: $("bg-color"),
  sketchClear: $("sketch-clear"),
  sketchLoad: $("sketch-load"),
  sketchResult: $("sketch-result"),
  sketchFile: $("sketch-file"),
  strength: $("strength"),
  strengthOut: $("strength-out"),
  generate: $("generate"),
  cancel: $("cancel"),
  stage: $("stage"),
  stageNote: $("stage-note"),
  preview: $("preview"),
  result: $("result"),
  progress: $("progress"),
  status: $("status"),
  download: $("download"),
  connText: $("conn-text"),
};

const LIVE_DEBOUNCE_MS = 250;
const TERMINAL = new Set(["complete", "cancelled", "error"]);
// Form fields by the dotted path an invalid_request error names.
const FIELD_INPUTS = {
  "params.prompt": "prompt",
  "params.negative_prompt": "negative",
  "params.steps": "steps",
  "params.width": "width",
  "params.height": "height",
  "params.seed": "seed",
  "params.scheduler": "scheduler",
  "params.guidance_scale": "guidance",
  "params.strength": "strength",
  "params.init_image": "sketch",
  "params.model": "model",
  "params.controls": "control-name",
};

// Where the page keeps what a reload needs to take its session over again.
const RESUME_KEY = "latentcast.resume";

const token = new URLSearchParams(location.search).get("token");

const app = {
  ws: null,
  welcome: null,
  retries: 0,
  counter: 0,
  submitGeneration: 0,
  current: null, // {id, state, steps, seed, width, height, format}
  unfinished: new Set(),
  pendingPreview: null,
  frameRequested: false,
  resultUrl: null,
  liveTimer: 0,
  // Resumable session: the token of the latest welcome, the last seq processed, and
  // what to ask for on the next connection ({token, after} or null).
  resumeToken: null,
  seq: 0,
  resume: null,
};

// ------------------------------------------------------------------ connection

function wsUrl() {
  // Relative to the page, so that the client also works behind a path prefix.
  const url = new URL("v1/ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  if (token) url.searchParams.set("token", token);
  if (app.resume) {
    url.searchParams.set("resume", app.resume.token);
    url.searchParams.set("after", String(app.resume.after));
  } else {
    url.searchParams.set("resumable", "1");
  }
  return url.href;
}

// ------------------------------------------------------------------ resuming

function saveResumeState() {
  if (!app.resumeToken) return;
  const current = app.current && app.unfinished.has(app.current.id) ? { id: app.current.id } : null;
  try {
    sessionStorage.setItem(RESUME_KEY, JSON.stringify({ token: app.resumeToken, seq: app.seq, current }));
  } catch {
    // storage full or disabled: a reload then starts a new session
  }
}

// A reloaded page: take the session over, replaying everything the server kept (after=0),
// since nothing of it is on this page yet.
function restoreResumeState() {
  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(RESUME_KEY) || "null");
  } catch {
    saved = null;
  }
  if (!saved || typeof saved.token !== "string") return;
  app.resume = { token: saved.token, after: 0 };
  if (saved.current && typeof saved.current.id === "string") {
    app.current = { id: saved.current.id, state: "submitting", drawnStep: 0, note: "", restored: true };
    app.unfinished.add(saved.current.id);
    el.status.dataset.job = saved.current.id;
  }
}

function setConn(state, text) {
  document.body.dataset.conn = state;
  el.connText.textContent = text;
}

function connect() {
  setConn("connecting", "connecting…");
  let opened = false;
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  app.ws = ws;
  ws.onopen = () => {
    opened = true;
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") return; // the protocol is binary only
    let message;
    try {
      message = decoder.decode(new Uint8Array(event.data));
    } catch (error) {
      console.warn("latentcast: undecodable frame", error);
      return;
    }
    if (message && typeof message === "object" && typeof message.type === "string") {
      if (typeof message.seq === "number") {
        if (message.seq <= app.seq) return; // already processed before the connection dropped
        app.seq = message.seq;
      }
      handle(message);
    }
  };
  ws.onclose = (event) => {
    if (app.ws !== ws) return;
    app.ws = null;
    app.welcome = null;
    el.generate.disabled = true;
    // 1001: the server shut down, 1008: it sent this client away; anything else is a
    // dropped connection that the session outlives for a while (section 2a).
    const resumable = app.resumeToken && event.code !== 1001 && event.code !== 1008;
    if (resumable) {
      app.resume = { token: app.resumeToken, after: app.seq };
    } else {
      app.resume = null;
      app.resumeToken = null;
      jobsLost("The connection closed before the job ended.");
    }
    el.cancel.disabled = true;
    updateGenerate();
    if (el.status.dataset.state === "idle") el.status.textContent = "Not connected: waiting for the server…";
    const delay = resumable && app.retries === 0 ? 100 : Math.min(10_000, 500 * 2 ** app.retries++);
    if (resumable && app.retries === 0) app.retries = 1;
    const retry = `retrying in ${Math.round(delay / 1000)} s`;
    setTimeout(connect, delay);
    if (opened) {
      setConn("closed", `disconnected (${event.code || "no code"}); ${retry}`);
      return;
    }
    // A browser does not tell why an upgrade was refused; /ready tells loading or draining
    // (503) apart from the rest: a token (401), the origin (403) or the connection limit.
    setConn("closed", `cannot connect; ${retry}`);
    whyRefused().then((why) => {
      if (!app.ws || app.ws.readyState !== WebSocket.OPEN) setConn("closed", `${why}; ${retry}`);
    });
  };
}

async function whyRefused() {
  try {
    const response = await fetch(new URL("ready", location.href), { cache: "no-store" });
    const body = await response.json();
    if (!body.ready) return `server not ready (${body.reason || "unavailable"})`;
  } catch {
    return "server unreachable";
  }
  if (token) return "connection refused: wrong token, origin not allowed, or server full";
  return "connection refused: if the server needs a token, open this page with ?token=…";
}

function send(message) {
  if (!app.ws || app.ws.readyState !== WebSocket.OPEN) return false;
  app.ws.send(encoder.encode(message));
  return true;
}

// ------------------------------------------------------------------ server messages

function handle(message) {
  dispatch(message);
  updateGenerate();
  if (app.resumeToken && message.type !== "progress" && message.type !== "preview") saveResumeState();
}

function dispatch(message) {
  const job = app.current && message.id === app.current.id ? app.current : null;
  switch (message.type) {
    case "welcome":
      onWelcome(message);
      return;
    case "draining":
      setConn("open", "server is shutting down: no new jobs");
      el.generate.disabled = true;
      if (el.status.dataset.state === "idle") el.status.textContent = "The server is shutting down: no new jobs.";
      return;
    case "accepted":
    case "queued":
      if (message.type === "accepted" && job && !TERMINAL.has(job.state)) app.unfinished.add(message.id);
      if (job && job.state !== "running" && !TERMINAL.has(job.state)) {
        const ahead = message.position;
        setJobState("queued", withNote(job, ahead > 0 ? `Queued: ${ahead} job(s) ahead.` : "Starting…"));
      }
      return;
    case "started":
      if (job) onStarted(job, message);
      return;
    case "progress":
      if (job && job.restored && !TERMINAL.has(job.state) && job.state !== "running") {
        // A page reloaded after the job's start was out of the replay window.
        job.state = "running";
        job.steps = message.steps;
        el.status.dataset.state = "running";
        el.cancel.disabled = false;
      }
      if (job && job.state === "running") {
        el.progress.max = message.steps;
        el.progress.value = message.step;
        el.status.textContent = withNote(
          job,
          `Step ${message.step}/${message.steps} · ${(message.elapsed_ms / 1000).toFixed(1)} s · seed ${job.seed}`,
        );
      }
      return;
    case "preview":
      if (job && job.state === "running") {
        app.pendingPreview = message;
        requestFrame();
      }
      return;
    case "complete":
      app.unfinished.delete(message.id);
      if (job) onComplete(job, message);
      return;
    case "cancelled":
      app.unfinished.delete(message.id);
      if (job) {
        const why = message.reason === "client" ? "" : ` (${message.reason})`;
        setJobState("cancelled", `Cancelled at step ${message.step}${why}.`);
        markStage(job.drawnStep > 0 ? `Cancelled at step ${message.step}/${job.steps}` : "Cancelled before the first preview");
      }
      return;
    case "error":
      onError(job, message);
      return;
    default:
      return; // unknown types are ignored, as are unknown keys
  }
}

function onWelcome(welcome) {
  const resuming = app.resume !== null;
  app.welcome = welcome;
  app.retries = 0;
  app.resume = null;
  app.resumeToken = typeof welcome.resume_token === "string" ? welcome.resume_token : null;
  if (!welcome.resumed) {
    app.seq = 0;
    if (resuming) jobsLost("The session expired while the page was away: its jobs were cancelled.");
  }
  saveResumeState();
  const { limits, defaults } = welcome;
  const models = Array.isArray(welcome.models) && welcome.models.length ? welcome.models : [welcome.model];
  const chosen = el.model.value;
  el.model.replaceChildren(...models.map((info) => new Option(info.name, info.name)));
  if (models.some((info) => info.name === chosen)) el.model.value = chosen;
  el.modelField.hidden = models.length < 2;
  const model = selectedModel();
  setConn("open", `${welcome.model.name} (${welcome.model.family}) · ${welcome.server}`);

  el.steps.max = limits.max_steps;
  el.width.max = limits.max_width;
  el.height.max = limits.max_height;
  if (!el.form.dataset.initialised) {
    // First welcome: the server's defaults. Later ones (reconnects) keep the user's values.
    el.form.dataset.initialised = "1";
    el.steps.value = defaults.steps;
    el.width.value = defaults.width;
    el.height.value = defaults.height;
    el.guidance.value = defaults.guidance_scale;
    el.guidanceOut.value = Number(defaults.guidance_scale).toFixed(1);
    resizeSketch();
  }
  if (el.status.dataset.state === "idle") {
    el.status.textContent = `Ready: ${model.name} (${model.family}). Type a prompt and press Generate.`;
  }
  showModel(defaults);
  el.generate.disabled = false;
}

// The model chosen in the selector (the default one when there is no choice).
function selectedModel() {
  const welcome = app.welcome;
  const models = Array.isArray(welcome.models) && welcome.models.length ? welcome.models : [welcome.model];
  return models.find((info) => info.name === el.model.value) || welcome.model;
}

// Every rule is the chosen model's: its schedulers, modes, ControlNets and preview factors.
function showModel(defaults = app.welcome.defaults) {
  const model = selectedModel();
  const previous = el.scheduler.value;
  const fallback = model.schedulers.includes(defaults.scheduler) ? defaults.scheduler : model.schedulers[0];
  el.scheduler.replaceChildren(
    ...model.schedulers.map((name) => new Option(name, name, false, name === fallback)),
  );
  if (model.schedulers.includes(previous)) el.scheduler.value = previous;

  const latentOption = el.previewKind.querySelector('option[value="latent"]');
  latentOption.disabled = !model.latent_rgb;
  if (!model.latent_rgb && el.previewKind.value === "latent") el.previewKind.value = "image";

  const controls = (app.welcome.features || []).includes("controls") ? model.controlnets || [] : [];
  const chosenControl = el.controlName.value;
  el.controlName.replaceChildren(...controls.map((name) => new Option(name, name)));
  if (controls.includes(chosenControl)) el.controlName.value = chosenControl;
  const canImg2img = model.modes.includes("img2img");
  el.sketchAs.querySelector('option[value="img2img"]').disabled = !canImg2img;
  el.sketchAs.querySelector('option[value="control"]').disabled = controls.length === 0;
  if (el.sketchAs.selectedOptions[0]?.disabled) {
    el.sketchAs.value = canImg2img ? "img2img" : "control";
  }
  el.img2img.disabled = !canImg2img && controls.length === 0;
  if (el.img2img.disabled) el.useSketch.checked = false;
  showSketchUse();
}

function showSketchUse() {
  const control = el.sketchAs.value === "control";
  el.strengthField.hidden = control;
  el.controlFields.hidden = !control;
}

// The jobs of a session that is gone: the current one ends here with an error.
function jobsLost(text) {
  app.unfinished.clear();
  if (app.current && !TERMINAL.has(app.current.state)) {
    setJobState("error", text);
    if (app.current.drawnStep > 0) markStage("Interrupted");
  }
  try {
    sessionStorage.removeItem(RESUME_KEY);
  } catch {
    // nothing kept
  }
}

function onStarted(job, message) {
  job.state = "running";
  job.steps = message.steps;
  job.seed = message.seed;
  job.width = message.width;
  job.height = message.height;
  if (el.preview.width !== message.width || el.preview.height !== message.height) {
    el.preview.width = message.width;
    el.preview.height = message.height;
  }
  el.progress.max = Math.max(1, message.steps);
  el.progress.value = 0;
  setJobState("running", withNote(job, `Step 0/${message.steps} · seed ${message.seed}`));
}

async function onComplete(job, message) {
  job.state = "finishing"; // no preview is drawn over the result any more
  const image = message.images[0];
  const type = `image/${image.format}`;
  const blob = new Blob([image.data], { type });
  if (app.resultUrl) URL.revokeObjectURL(app.resultUrl);
  app.resultUrl = URL.createObjectURL(blob);
  el.result.width = image.width;
  el.result.height = image.height;
  el.result.src = app.resultUrl;
  try {
    await el.result.decode();
  } catch {
    // shown anyway; the browser says why in its console
  }
  if (app.current !== job) return;
  el.progress.value = el.progress.max;
  el.result.hidden = false;
  unmarkStage();
  el.stage.classList.add("done", "started");
  el.download.href = app.resultUrl;
  el.download.download = `latentcast-${image.seed}.${image.format === "jpeg" ? "jpg" : image.format}`;
  el.download.textContent = `Download ${image.format.toUpperCase()}`;
  el.download.hidden = false;
  el.sketchResult.disabled = false;
  const { queued_ms, run_ms } = message.timings;
  setJobState(
    "complete",
    `Done: ${image.width}×${image.height}, seed ${image.seed}, ${(run_ms / 1000).toFixed(1)} s` +
      (queued_ms > 50 ? ` (+${(queued_ms / 1000).toFixed(1)} s queued)` : ""),
  );
}

function onError(job, message) {
  if (typeof message.id === "string") app.unfinished.delete(message.id);
  if (job) {
    const input = message.field && (FIELD_INPUTS[message.field] || FIELD_INPUTS[message.field.split(".").slice(0, 2).join(".")]);
    if (input) $(input).classList.add("invalid");
    const where = message.field ? ` [${message.field}]` : "";
    setJobState("error", `${message.code}${where}: ${message.message}`);
    if (job.drawnStep > 0) markStage(`Failed: ${message.code}`);
  } else if (message.id == null) {
    console.warn("latentcast: server error", message);
  }
}

function setJobState(state, text) {
  if (app.current) app.current.state = state;
  el.status.dataset.state = state;
  el.status.textContent = text;
  const active = !TERMINAL.has(state) && state !== "idle";
  el.cancel.disabled = !active;
}

// Generate reads "Replace" while the current job is unfinished: pressing it stops that job.
function updateGenerate() {
  const replacing = Boolean(app.current && app.unfinished.has(app.current.id));
  el.generate.textContent = replacing ? "Replace" : "Generate";
  el.generate.title = replacing ? "Stop the running job and start one with these settings" : "";
}

// A job that replaced another one outside live mode says so while it runs.
function withNote(job, text) {
  return job.note ? `${text} · ${job.note}` : text;
}

// What a cancelled or failed job left on the stage is dimmed and labelled, so that it is
// not taken for the picture of a job that is still coming; the next preview or result
// clears the mark.
function markStage(text) {
  el.stage.classList.add("stale");
  el.stageNote.textContent = text;
  el.stageNote.hidden = false;
}

function unmarkStage() {
  el.stage.classList.remove("stale");
  el.stageNote.hidden = true;
  el.stageNote.textContent = "";
}

// ------------------------------------------------------------------ previews

function requestFrame() {
  if (app.frameRequested) return;
  app.frameRequested = true;
  requestAnimationFrame(() => {
    app.frameRequested = false;
    const message = app.pendingPreview;
    app.pendingPreview = null;
    if (message) drawPreview(message);
  });
}

async function drawPreview(message) {
  const job = app.current;
  if (!job || message.id !== job.id || job.state !== "running") return;
  let source;
  if (message.kind === "latent") {
    source = latentToCanvas(message);
  } else if (message.kind === "image") {
    try {
      source = await createImageBitmap(new Blob([message.data], { type: `image/${message.format}` }));
    } catch (error) {
      console.warn("latentcast: undecodable preview", error);
      return;
    }
    // A later preview may have been drawn while this one decoded.
    if (app.current !== job || job.state !== "running" || message.step < job.drawnStep) return;
  }
  if (!source) return;
  const ctx = el.preview.getContext("2d");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(source, 0, 0, el.preview.width, el.preview.height);
  if (source.close) source.close();
  job.drawnStep = message.step;
  el.result.hidden = true;
  el.download.hidden = true;
  unmarkStage();
  el.stage.classList.remove("done");
  el.stage.classList.add("started");
  el.preview.dataset.step = String(message.step);
  el.preview.dataset.previews = String(Number(el.preview.dataset.previews) + 1);
}

let halfTable = null;

// float16 bit pattern -> number, for all 65536 patterns (built on first use).
function halfToFloatTable() {
  if (halfTable) return halfTable;
  halfTable = new Float32Array(65536);
  for (let bits = 0; bits < 65536; bits++) {
    const sign = bits & 0x8000 ? -1 : 1;
    const exponent = (bits >> 10) & 0x1f;
    const fraction = bits & 0x3ff;
    let value;
    if (exponent === 0) value = fraction * 2 ** -24;
    else if (exponent === 31) value = fraction ? Number.NaN : Number.POSITIVE_INFINITY;
    else value = (1 + fraction / 1024) * 2 ** (exponent - 15);
    halfTable[bits] = sign * value;
  }
  return halfTable;
}

const latentCanvas = document.createElement("canvas");

// Raw little-endian float16 [c, h, w] latent -> RGBA bytes of h x w pixels, with the
// model's latent_rgb: v = sum_c latent[c] * factors[c][k] + bias[k], clamped to -1..1,
// then round((v + 1) * 127.5). Null when the shape, dtype or size does not fit.
function latentToRgba(shape, data, rgb, dtype = "float16") {
  const [channels, height, width] = shape;
  if (!rgb || dtype !== "float16" || rgb.factors.length !== channels) return null;
  const plane = height * width;
  if (!(plane > 0) || data.length !== channels * plane * 2) return null;
  const table = halfToFloatTable();
  const { factors, bias } = rgb;
  const pixels = new Uint8ClampedArray(plane * 4);
  for (let p = 0; p < plane; p++) {
    let r = bias[0];
    let g = bias[1];
    let b = bias[2];
    for (let c = 0; c < channels; c++) {
      const i = (c * plane + p) * 2;
      const v = table[data[i] | (data[i + 1] << 8)];
      const f = factors[c];
      r += v * f[0];
      g += v * f[1];
      b += v * f[2];
    }
    const o = p * 4;
    pixels[o] = toByte(r);
    pixels[o + 1] = toByte(g);
    pixels[o + 2] = toByte(b);
    pixels[o + 3] = 255;
  }
  return pixels;
}

function latentToCanvas(message) {
  const job = app.current;
  const rgb = job && job.model ? job.model.latent_rgb : app.welcome && app.welcome.model.latent_rgb;
  const pixels = latentToRgba(message.shape, message.data, rgb, message.dtype);
  if (!pixels) {
    console.warn("latentcast: latent preview does not fit the model's latent_rgb", message.shape);
    return null;
  }
  const [, height, width] = message.shape;
  latentCanvas.width = width;
  latentCanvas.height = height;
  latentCanvas.getContext("2d").putImageData(new ImageData(pixels, width, height), 0, 0);
  return latentCanvas;
}

function toByte(v) {
  if (!(v > -1)) return v > 0 ? 255 : 0; // -1 and below, and NaN
  return v >= 1 ? 255 : Math.round((v + 1) * 127.5);
}

// ------------------------------------------------------------------ submitting

function readInt(input, fallback) {
  const value = input.value.trim();
  if (value === "") return fallback;
  const number = Number(value);
  return Number.isInteger(number) ? number : Number.NaN;
}

async function submit() {
  if (!app.welcome) return;
  const generation = ++app.submitGeneration;
  for (const node of el.form.querySelectorAll(".invalid")) node.classList.remove("invalid");

  const params = {
    prompt: el.prompt.value,
    negative_prompt: el.negative.value || undefined,
    steps: readInt(el.steps, undefined),
    width: readInt(el.width, undefined),
    height: readInt(el.height, undefined),
    seed: readInt(el.seed, undefined),
    guidance_scale: Number(el.guidance.value),
    scheduler: el.scheduler.value || undefined,
  };
  // Refuse what the server would refuse, without a round trip.
  for (const [key, input] of [["steps", el.steps], ["width", el.width], ["height", el.height], ["seed", el.seed]]) {
    if (Number.isNaN(params[key])) {
      input.classList.add("invalid");
      return;
    }
  }
  const model = selectedModel();
  if ((app.welcome.features || []).includes("models")) params.model = model.name;
  if (el.useSketch.checked && !el.img2img.disabled) {
    const image = await sketchPng(params.width, params.height);
    if (el.sketchAs.value === "control") {
      // A scribble: the ControlNet steers the picture; the model starts from noise.
      params.controls = [
        {
          name: el.controlName.value,
          image,
          scale: Number(el.controlScale.value),
          preprocess: el.controlInvert.checked ? "invert" : "none",
        },
      ];
    } else {
      params.init_image = image;
      params.strength = Number(el.strength.value);
    }
    // Only the newest of overlapping submits (live mode) goes out.
    if (generation !== app.submitGeneration) return;
  }
  const kind = el.previewKind.value;
  const message = {
    type: "submit",
    id: `w${++app.counter}-${Date.now().toString(36)}`,
    params,
    preview: kind === "none" ? undefined : { kind, every: 1 },
  };
  const previous = app.current;
  let note = "";
  if (previous && app.unfinished.has(previous.id)) {
    message.replaces = previous.id;
    // Live mode replaces on every edit, as the user asked; anywhere else it is news.
    if (!el.live.checked) note = `replaced the ${previous.state === "running" ? "running" : "queued"} job`;
  }
  if (!send(message)) return;

  app.unfinished.add(message.id);
  app.current = { id: message.id, state: "submitting", drawnStep: 0, note, model };
  el.status.dataset.job = message.id;
  app.pendingPreview = null;
  el.preview.dataset.previews = "0";
  el.preview.dataset.step = "0";
  el.progress.value = 0;
  setJobState("submitting", withNote(app.current, "Submitted…"));
  updateGenerate();
  saveResumeState();
}

function cancel() {
  const job = app.current;
  if (job && app.unfinished.has(job.id)) send({ type: "cancel", id: job.id });
}

function liveChanged() {
  if (!el.live.checked || !app.welcome) return;
  clearTimeout(app.liveTimer);
  app.liveTimer = setTimeout(submit, LIVE_DEBOUNCE_MS);
}

// ------------------------------------------------------------------ sketch (img2img)

const SKETCH_SIDE = 256;
const sketchCtx = el.sketch.getContext("2d");

function fillBackground() {
  sketchCtx.fillStyle = el.bgColor.value;
  sketchCtx.fillRect(0, 0, el.sketch.width, el.sketch.height);
}

// The sketch keeps the job's aspect ratio; what is drawn is scaled along. Only the canvas
// inside its fixed box (.sketch-box) changes, never the layout around it: a size field
// loses focus on the mousedown of the click that follows, and a Generate button that moved
// then would not get the mouseup, so the click would be lost.
function resizeSketch() {
  const w = Number(el.width.value) || SKETCH_SIDE;
  const h = Number(el.height.value) || SKETCH_SIDE;
  const scale = SKETCH_SIDE / Math.max(w, h);
  const width = Math.max(8, Math.round(w * scale));
  const height = Math.max(8, Math.round(h * scale));
  el.sketch.style.width = `${(100 * width) / SKETCH_SIDE}%`;
  el.sketch.style.height = `${(100 * height) / SKETCH_SIDE}%`;
  if (width === el.sketch.width && height === el.sketch.height) return;
  const copy = document.createElement("canvas");
  copy.width = el.sketch.width;
  copy.height = el.sketch.height;
  copy.getContext("2d").drawImage(el.sketch, 0, 0);
  el.sketch.width = width;
  el.sketch.height = height;
  fillBackground();
  sketchCtx.drawImage(copy, 0, 0, width, height);
}

function sketchPng(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width || el.sketch.width;
  canvas.height = height || el.sketch.height;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(el.sketch, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve, reject) => {
    canvas.toBlob((blob) => {
      if (!blob) reject(new Error("the sketch could not be encoded"));
      else blob.arrayBuffer().then((buffer) => resolve(new Uint8Array(buffer)), reject);
    }, "image/png");
  });
}

function drawCover(image) {
  fillBackground();
  const { width, height } = el.sketch;
  const scale = Math.max(width / image.width, height / image.height);
  const w = image.width * scale;
  const h = image.height * scale;
  sketchCtx.drawImage(image, (width - w) / 2, (height - h) / 2, w, h);
}

let stroke = null;

function sketchPoint(event) {
  const box = el.sketch.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) / box.width) * el.sketch.width,
    y: ((event.clientY - box.top) / box.height) * el.sketch.height,
  };
}

el.sketch.addEventListener("pointerdown", (event) => {
  el.sketch.setPointerCapture(event.pointerId);
  stroke = sketchPoint(event);
  sketchCtx.lineCap = "round";
  sketchCtx.lineJoin = "round";
  sketchCtx.strokeStyle = el.brushColor.value;
  sketchCtx.fillStyle = el.brushColor.value;
  sketchCtx.lineWidth = Number(el.brushSize.value);
  sketchCtx.beginPath();
  sketchCtx.arc(stroke.x, stroke.y, sketchCtx.lineWidth / 2, 0, Math.PI * 2);
  sketchCtx.fill();
});
el.sketch.addEventListener("pointermove", (event) => {
  if (!stroke) return;
  const point = sketchPoint(event);
  sketchCtx.beginPath();
  sketchCtx.moveTo(stroke.x, stroke.y);
  sketchCtx.lineTo(point.x, point.y);
  sketchCtx.stroke();
  stroke = point;
});
for (const type of ["pointerup", "pointercancel"]) {
  el.sketch.addEventListener(type, () => {
    if (!stroke) return;
    stroke = null;
    if (el.useSketch.checked) liveChanged();
  });
}
el.sketchClear.addEventListener("click", () => {
  fillBackground();
  if (el.useSketch.checked) liveChanged();
});
el.bgColor.addEventListener("change", () => {
  fillBackground();
  if (el.useSketch.checked) liveChanged();
});
el.sketchLoad.addEventListener("click", () => el.sketchFile.click());
el.sketchFile.addEventListener("change", async () => {
  const file = el.sketchFile.files[0];
  if (!file) return;
  try {
    const bitmap = await createImageBitmap(file);
    drawCover(bitmap);
    bitmap.close();
    el.useSketch.checked = true;
    liveChanged();
  } catch (error) {
    el.status.textContent = `That image could not be read: ${error.message}`;
  }
  el.sketchFile.value = "";
});
el.sketchResult.addEventListener("click", () => {
  if (!el.result.complete || !el.result.naturalWidth) return;
  drawCover(el.result);
  el.useSketch.checked = true;
  liveChanged();
});

// ------------------------------------------------------------------ wiring

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  clearTimeout(app.liveTimer);
  submit();
});
el.cancel.addEventListener("click", cancel);
el.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    el.form.requestSubmit();
  }
});
el.guidance.addEventListener("input", () => {
  el.guidanceOut.value = Number(el.guidance.value).toFixed(1);
});
el.strength.addEventListener("input", () => {
  el.strengthOut.value = Number(el.strength.value).toFixed(2);
});
el.controlScale.addEventListener("input", () => {
  el.controlScaleOut.value = Number(el.controlScale.value).toFixed(2);
});
el.model.addEventListener("change", () => showModel());
el.sketchAs.addEventListener("change", showSketchUse);
for (const input of [el.width, el.height]) input.addEventListener("change", resizeSketch);
// Live mode: typing re-submits (debounced); other fields when they are changed.
for (const input of [el.prompt, el.negative]) input.addEventListener("input", liveChanged);
for (const input of [el.model, el.steps, el.width, el.height, el.seed, el.scheduler, el.guidance, el.previewKind, el.strength, el.useSketch, el.sketchAs, el.controlName, el.controlInvert, el.controlScale]) {
  input.addEventListener("change", liveChanged);
}
el.live.addEventListener("change", liveChanged);

// For tests and the console: the pure latent decoder.
window.latentcast = { latentToRgba };

fillBackground();
restoreResumeState();
connect();
