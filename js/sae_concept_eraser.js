// SAE Concept Eraser frontend: a step scrubber on Mask Preview (each recorded step's mask over the image) and a
// before/after slider on Compare. Touches only this pack's node types; every listener is removed with the node.
// DOM work only: the logic (payload parsing, step math, slider geometry) is in sae_logic.js.
//
// Works under the classic canvas and under Nodes 2.0 (the Vue node renderer, Comfy.VueNodes.Enabled):
// - results come from the API's "executed" event as well as from node.onExecuted (which Nodes 2.0 may never
//   call); the same output is drawn once (outputKey);
// - the panel keeps its state outside the DOM and redraws whenever its element is (re)attached or resized, so it
//   survives a renderer that culls off-screen nodes or re-mounts their widgets; a graph reloaded with stored
//   outputs (app.nodeOutputs) draws them again;
// - where the frontend has a core image-compare widget (a Vue widget, IMAGECOMPARE), Compare offers it too (it
//   reads the node output's a_images / b_images); our slider stays as the fallback and for a third branch;
// - a warning event from the backend (a run that never reached our patch) shows as a toast when the frontend has
//   toasts, else in the console.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  NODE_TYPES, PayloadError, clipRect, executedNodeIds, fitRect, isOurNodeType, outputKey, parseComparePayload,
  parseMaskPayload, sliderFraction, stepAfterKey, stepIndex, stepLabel, viewPath, warningText,
} from "./sae_logic.js";

const EXTENSION = "sae_concept_eraser.previews";
const WIDGET_HEIGHT = 300;

function el(tag, style = {}, props = {}) {
  const e = document.createElement(tag);
  Object.assign(e.style, style);
  Object.assign(e, props);
  return e;
}

function loadImage(ref) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not load ${ref.filename}`));
    img.src = api.apiURL(viewPath(ref));
  });
}

/** A canvas + control row in a DOM widget appended after the node's own widgets (never serialised). */
function makePanel(node, name) {
  const root = el("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
    boxSizing: "border-box", padding: "2px" });
  root.dataset.saeWidget = name;
  const canvas = el("canvas", { flex: "1 1 auto", minHeight: "0", width: "100%", objectFit: "contain",
    imageRendering: "pixelated", background: "#111", borderRadius: "4px", touchAction: "none" });
  canvas.width = 1;
  canvas.height = 1;
  const row = el("div", { display: "flex", alignItems: "center", gap: "6px", fontSize: "11px", color: "#ddd" });
  const range = el("input", { flex: "1 1 auto", minWidth: "40px" }, { type: "range", min: "0", max: "0", step: "1", value: "0", disabled: true });
  range.setAttribute("aria-label", name === "sae_step_scrubber" ? "recorded step" : "before / after position");
  const caption = el("span", { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", maxWidth: "60%" });
  row.append(range, caption);
  root.append(canvas, row);
  const widget = node.addDOMWidget(name, "sae_panel", root, {
    serialize: false, hideOnZoom: false, getMinHeight: () => WIDGET_HEIGHT, getMaxHeight: () => 4 * WIDGET_HEIGHT,
  });
  widget.serialize = false;
  const controller = new AbortController();
  const panel = { widget, root, canvas, row, range, caption, signal: controller.signal, redraw: null };
  // (re)attached or resized (a renderer that culls or re-mounts widgets): draw the kept state again
  let observer = null;
  if (typeof ResizeObserver !== "undefined") {
    observer = new ResizeObserver(() => panel.redraw?.());
    observer.observe(root);
  }
  panel.abort = () => {
    controller.abort();
    observer?.disconnect();
  };
  return panel;
}

// ------------------------------------------------------------------------------------------------ Mask Preview

function setupMaskPreview(node) {
  const p = makePanel(node, "sae_step_scrubber");
  p.caption.textContent = "run the graph to scrub through the recorded steps";
  const state = { entry: null, base: null, masks: [], index: 0, token: 0 };

  function draw() {
    const { entry, base } = state;
    if (!entry || !base) return;
    const ctx = p.canvas.getContext("2d");
    p.canvas.width = entry.width;
    p.canvas.height = entry.height;
    ctx.imageSmoothingEnabled = false; // the mask is the block's patch grid: show its cells, not a blur
    ctx.drawImage(base, 0, 0, entry.width, entry.height);
    const mask = state.masks[state.index];
    if (mask) ctx.drawImage(mask, 0, 0, entry.width, entry.height);
    p.caption.textContent = stepLabel(entry, state.index);
    p.root.dataset.step = String(state.index);
  }
  p.redraw = draw;

  function show(index) {
    if (!state.entry) return;
    state.index = stepIndex(index, state.entry.steps.length);
    p.range.value = String(state.index);
    draw();
  }

  p.range.addEventListener("input", () => show(Number(p.range.value)), { signal: p.signal });
  p.range.addEventListener("keydown", (ev) => {
    const next = state.entry && stepAfterKey(state.index, ev.key, state.entry.steps.length);
    if (next !== null && next !== undefined) {
      ev.preventDefault();
      ev.stopPropagation(); // keep arrows away from the canvas shortcuts
      show(next);
    }
  }, { signal: p.signal });

  async function onOutput(output) {
    let entries;
    try {
      entries = parseMaskPayload(output);
    } catch (e) {
      p.caption.textContent = e instanceof PayloadError ? `bad payload: ${e.message}` : String(e);
      return;
    }
    if (!entries.length) return;
    const entry = entries[0]; // the first image of the batch
    const token = ++state.token;
    p.caption.textContent = "loading masks…";
    try {
      const [base, ...masks] = await Promise.all([loadImage(entry.base), ...entry.masks.map(loadImage)]);
      if (token !== state.token) return; // a newer run arrived meanwhile
      Object.assign(state, { entry, base, masks });
      p.range.max = String(Math.max(0, entry.steps.length - 1));
      p.range.disabled = entry.steps.length < 2;
      show(entry.steps.length - 1);
    } catch (e) {
      p.caption.textContent = String(e.message ?? e);
    }
  }

  return { onOutput, show, state, panel: p };
}

// ------------------------------------------------------------------------------------------------ Compare

function setupCompare(node) {
  const p = makePanel(node, "sae_compare_slider");
  p.caption.textContent = "run the graph, then drag to compare";
  p.range.max = "1000";
  const select = el("select", { maxWidth: "40%", fontSize: "11px" });
  select.hidden = true;
  p.row.append(select);
  const state = { branches: [], images: [], right: 1, fraction: 0.5, token: 0 };

  function draw() {
    const [a, b] = [state.images[0], state.images[state.right]];
    if (!a || !b) return;
    const w = a.naturalWidth;
    const h = a.naturalHeight;
    p.canvas.width = w;
    p.canvas.height = h;
    const ctx = p.canvas.getContext("2d");
    const rect = { x: 0, y: 0, w, h };
    ctx.drawImage(a, 0, 0, w, h);
    const c = clipRect(state.fraction, rect);
    ctx.save();
    ctx.beginPath();
    ctx.rect(c.x, c.y, c.w, c.h);
    ctx.clip();
    ctx.drawImage(b, 0, 0, w, h);
    ctx.restore();
    ctx.fillStyle = "#fff";
    ctx.fillRect(Math.round(c.x) - 1, 0, 2, h);
    const fs = Math.max(10, Math.round(h / 28));
    ctx.font = `${fs}px sans-serif`;
    ctx.textBaseline = "top";
    for (const [text, x, align] of [[state.branches[0].label, 6, "left"], [state.branches[state.right].label, w - 6, "right"]]) {
      ctx.textAlign = align;
      ctx.fillStyle = "rgba(0,0,0,0.6)";
      const tw = ctx.measureText(text).width;
      ctx.fillRect(align === "left" ? x - 3 : x - tw - 3, 4, tw + 6, fs + 6);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x, 7); // canvas text: labels are never parsed as markup
    }
    p.caption.textContent = `${state.branches[0].label} | ${state.branches[state.right].label}: ${Math.round(state.fraction * 100)}%`;
    p.root.dataset.fraction = state.fraction.toFixed(3);
  }
  p.redraw = draw;

  function setFraction(f) {
    state.fraction = Math.min(1, Math.max(0, f));
    p.range.value = String(Math.round(state.fraction * 1000));
    draw();
  }

  let dragging = false;
  function pointerToFraction(ev) {
    const box = p.canvas.getBoundingClientRect();
    const shown = fitRect(p.canvas.width, p.canvas.height, box.width, box.height);
    return sliderFraction(ev.clientX - box.left, shown);
  }
  p.canvas.addEventListener("pointerdown", (ev) => {
    if (!state.images.length) return;
    dragging = true;
    p.canvas.setPointerCapture(ev.pointerId);
    setFraction(pointerToFraction(ev));
    ev.stopPropagation();
  }, { signal: p.signal });
  p.canvas.addEventListener("pointermove", (ev) => {
    if (dragging) setFraction(pointerToFraction(ev));
  }, { signal: p.signal });
  for (const type of ["pointerup", "pointercancel"]) {
    p.canvas.addEventListener(type, () => { dragging = false; }, { signal: p.signal });
  }
  p.range.addEventListener("input", () => setFraction(Number(p.range.value) / 1000), { signal: p.signal });
  select.addEventListener("change", () => {
    state.right = stepIndex(Number(select.value), state.branches.length) || 1;
    draw();
  }, { signal: p.signal });

  async function onOutput(output) {
    let branches;
    try {
      branches = parseComparePayload(output);
    } catch (e) {
      p.caption.textContent = e instanceof PayloadError ? `bad payload: ${e.message}` : String(e);
      return;
    }
    if (!branches.length) return;
    const token = ++state.token;
    try {
      const images = await Promise.all(branches.map((b) => loadImage(b.image)));
      if (token !== state.token) return;
      Object.assign(state, { branches, images, right: 1 });
      select.replaceChildren(...branches.slice(1).map((b, i) => el("option", {}, { value: String(i + 1), textContent: b.label })));
      select.hidden = branches.length < 3;
      p.range.disabled = false;
      setFraction(state.fraction);
    } catch (e) {
      p.caption.textContent = String(e.message ?? e);
    }
  }

  return { onOutput, setFraction, state, panel: p, core: offerCoreCompare(node) };
}

function vueNodesEnabled() {
  try {
    return Boolean(app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled"));
  } catch {
    return false;
  }
}

/** The frontend's own compare widget on our Compare node, where it has one (and renders it: Nodes 2.0). */
function offerCoreCompare(node) {
  // read at run time, not imported: the scripts/widgets.js shim is internal and warns on import in newer frontends
  const make = window.comfyAPI?.widgets?.ComfyWidgets?.IMAGECOMPARE;
  if (typeof make !== "function" || !vueNodesEnabled()) return null;
  try {
    const made = make(node, "sae_core_compare", ["IMAGECOMPARE", {}], app);
    const widget = made?.widget ?? made;
    if (!widget) return null;
    widget.serialize = false; // a view: never part of the saved widget values
    widget.options = { ...(widget.options ?? {}), serialize: false }; // nor of the prompt sent to the backend
    return widget;
  } catch (e) {
    console.warn("[SAE Concept Eraser] core compare widget not available:", e);
    return null;
  }
}

// ------------------------------------------------------------------------------------------------ registration

const SETUP = { [NODE_TYPES.maskPreview]: setupMaskPreview, [NODE_TYPES.compare]: setupCompare };

/** Draw ``output`` on ``node`` once, whichever path (onExecuted, the "executed" event, stored outputs) brings it. */
function deliver(node, output) {
  if (!node?.saeView) return false;
  const key = outputKey(output);
  if (key === null || node.saeOutputKey === key) return false;
  node.saeOutputKey = key;
  node.saeView.onOutput(output);
  return true;
}

function findOurNode(detail) {
  const graph = app.graph;
  if (!graph) return null;
  for (const id of executedNodeIds(detail)) {
    const node = graph.getNodeById?.(id) ?? graph.getNodeById?.(Number(id));
    if (node?.saeView) return node;
  }
  return null;
}

/** The output the frontend stored for ``node`` (reloaded graph, tab switch), where it keeps one. */
function storedOutput(node) {
  try {
    const outputs = app.nodeOutputs;
    return outputs?.[String(node.id)] ?? null;
  } catch {
    return null;
  }
}

function showWarning(text) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) {
    toast.add({ severity: "warn", summary: "SAE Concept Eraser", detail: text, life: 15000 });
  } else {
    console.warn(`[SAE Concept Eraser] ${text}`);
  }
}

let listening = false;

app.registerExtension({
  name: EXTENSION,
  setup() {
    if (listening) return;
    listening = true;
    // Nodes 2.0 may never call node.onExecuted: take every result from the API event too
    api.addEventListener("executed", (ev) => {
      const node = findOurNode(ev.detail);
      if (node) deliver(node, ev.detail?.output);
    });
    api.addEventListener("sae_concept_eraser.warning", (ev) => {
      const text = warningText(ev.detail);
      if (text) showWarning(text);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const setup = SETUP[nodeData?.name];
    if (!setup || !isOurNodeType(nodeData.name)) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.saeView = setup(this);
      this.saeOutputKey = null;
      const min = this.computeSize();
      this.setSize([Math.max(this.size[0], 340), Math.max(this.size[1], min[1])]);
      // a node made from a saved graph gets its id after creation: look for a stored output then
      setTimeout(() => {
        const out = storedOutput(this);
        if (out) deliver(this, out);
      }, 0);
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = onExecuted?.apply(this, arguments);
      deliver(this, output);
      return r;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.saeView?.panel.abort(); // every listener of the panel was added with this signal
      this.saeView = null;
      return onRemoved?.apply(this, arguments);
    };
  },
});
