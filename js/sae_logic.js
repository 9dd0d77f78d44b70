// Pure logic of the SAE Concept Eraser frontend extension (no DOM): payload parsing and validation, step index
// math, slider position -> clip rectangle, image fitting. Tested with `node --test tests/js/`.
// The payload contract (written by nodes/ui_payload.py) is described in its docstrings.

export const MASK_KEY = "sae_mask_steps";
export const COMPARE_KEY = "sae_compare";
export const NODE_TYPES = Object.freeze({ maskPreview: "SAEMaskPreview", compare: "SAECompare" });
const FOLDER_TYPES = new Set(["temp", "output", "input"]);

export class PayloadError extends Error {
  constructor(message) {
    super(message);
    this.name = "PayloadError";
  }
}

/** True only for this pack's node types (ids carry the "SAE" prefix). */
export function isOurNodeType(type) {
  return typeof type === "string" && type.startsWith("SAE");
}

function isInt(v) {
  return Number.isInteger(v);
}

/** A file reference {filename, subfolder, type} as ComfyUI's /view serves it; throws PayloadError otherwise. */
export function checkRef(ref, where) {
  if (ref === null || typeof ref !== "object") throw new PayloadError(`${where}: expected {filename, subfolder, type}, found ${typeof ref}`);
  const { filename, subfolder = "", type } = ref;
  if (typeof filename !== "string" || filename === "" || /[\\/]/.test(filename) || filename.includes("..")) {
    throw new PayloadError(`${where}: filename ${JSON.stringify(filename)} is not a plain file name`);
  }
  if (typeof subfolder !== "string" || subfolder.split(/[\\/]/).includes("..")) {
    throw new PayloadError(`${where}: subfolder ${JSON.stringify(subfolder)} is not a relative folder`);
  }
  if (!FOLDER_TYPES.has(type)) throw new PayloadError(`${where}: type ${JSON.stringify(type)} is not one of temp, output, input`);
  return { filename, subfolder, type };
}

/** The /view path of a file reference (pass it through api.apiURL in the browser). */
export function viewPath(ref) {
  const r = checkRef(ref, "image");
  const q = new URLSearchParams({ filename: r.filename, subfolder: r.subfolder, type: r.type });
  return `/view?${q.toString()}`;
}

/**
 * Mask Preview's ui output -> [{image, width, height, grid, steps, base, masks, branch, show, truncated}].
 * Returns [] when the output carries no step payload (an older node, or nothing recorded); throws PayloadError
 * when it is there but malformed.
 */
export function parseMaskPayload(output) {
  const list = output?.[MASK_KEY];
  if (list === undefined || list === null) return [];
  if (!Array.isArray(list)) throw new PayloadError(`${MASK_KEY}: expected a list, found ${typeof list}`);
  return list.map((e, i) => {
    const where = `${MASK_KEY}[${i}]`;
    if (e === null || typeof e !== "object") throw new PayloadError(`${where}: expected an object`);
    if (!isInt(e.width) || !isInt(e.height) || e.width < 1 || e.height < 1) {
      throw new PayloadError(`${where}: width/height ${e.width}x${e.height} are not positive integers`);
    }
    if (!Array.isArray(e.grid) || e.grid.length !== 2 || !e.grid.every((v) => isInt(v) && v > 0)) {
      throw new PayloadError(`${where}: grid ${JSON.stringify(e.grid)} is not [h, w]`);
    }
    if (!Array.isArray(e.steps) || !e.steps.every((s) => typeof s === "number" && Number.isFinite(s))) {
      throw new PayloadError(`${where}: steps must be a list of numbers`);
    }
    if (!Array.isArray(e.masks) || e.masks.length !== e.steps.length) {
      throw new PayloadError(`${where}: ${e.masks?.length} masks for ${e.steps.length} steps; expected one per step`);
    }
    return {
      image: isInt(e.image) ? e.image : i,
      width: e.width,
      height: e.height,
      grid: [e.grid[0], e.grid[1]],
      steps: e.steps.slice(),
      base: checkRef(e.base, `${where}.base`),
      masks: e.masks.map((m, s) => checkRef(m, `${where}.masks[${s}]`)),
      branch: typeof e.branch === "string" ? e.branch : "cond",
      show: typeof e.show === "string" ? e.show : "mask",
      truncated: e.truncated === true,
    };
  });
}

/** Compare's ui output -> [{label, image, width, height}] (2 or 3 branches), [] when absent. */
export function parseComparePayload(output) {
  const list = output?.[COMPARE_KEY];
  if (list === undefined || list === null) return [];
  if (!Array.isArray(list) || list.length < 2 || list.length > 3) {
    throw new PayloadError(`${COMPARE_KEY}: expected 2 or 3 branches, found ${Array.isArray(list) ? list.length : typeof list}`);
  }
  return list.map((b, i) => {
    const where = `${COMPARE_KEY}[${i}]`;
    if (b === null || typeof b !== "object") throw new PayloadError(`${where}: expected an object`);
    if (!isInt(b.width) || !isInt(b.height) || b.width < 1 || b.height < 1) {
      throw new PayloadError(`${where}: width/height ${b.width}x${b.height} are not positive integers`);
    }
    return { label: String(b.label ?? `branch ${i + 1}`), image: checkRef(b.image, `${where}.image`), width: b.width, height: b.height };
  });
}

/** Index of a step for a scrubber value (any number), clamped into 0..count-1; -1 when there are no steps. */
export function stepIndex(value, count) {
  if (!isInt(count) || count <= 0) return -1;
  const v = Math.round(Number(value));
  if (!Number.isFinite(v)) return 0;
  return Math.min(count - 1, Math.max(0, v));
}

/** Next index after a key press (ArrowLeft/Right, Home, End, PageUp/Down); null for other keys. */
export function stepAfterKey(index, key, count) {
  if (count <= 0) return null;
  const moves = { ArrowLeft: index - 1, ArrowDown: index - 1, ArrowRight: index + 1, ArrowUp: index + 1, Home: 0,
    End: count - 1, PageDown: index - 10, PageUp: index + 10 };
  return key in moves ? stepIndex(moves[key], count) : null;
}

/** The scrubber's caption: which recorded step is shown, out of how many. */
export function stepLabel(entry, index) {
  const n = entry.steps.length;
  if (n === 0) return "no recorded steps";
  const i = stepIndex(index, n);
  const more = entry.truncated ? " (more not sent)" : "";
  return `step ${entry.steps[i]} · ${i + 1}/${n} · ${entry.branch} ${entry.show}${more}`;
}

/** Where an image of srcW x srcH is drawn inside a box of boxW x boxH (contain, centred). */
export function fitRect(srcW, srcH, boxW, boxH) {
  if (!(srcW > 0 && srcH > 0 && boxW > 0 && boxH > 0)) return { x: 0, y: 0, w: 0, h: 0 };
  const s = Math.min(boxW / srcW, boxH / srcH);
  const w = srcW * s;
  const h = srcH * s;
  return { x: (boxW - w) / 2, y: (boxH - h) / 2, w, h };
}

/** Slider fraction 0..1 of a pointer x inside the drawn image rect (clamped at its edges). */
export function sliderFraction(pointerX, rect) {
  if (!(rect.w > 0)) return 0.5;
  return Math.min(1, Math.max(0, (pointerX - rect.x) / rect.w));
}

/** The part of ``rect`` that shows the "after" image for a slider at ``fraction``: right of the divider. */
export function clipRect(fraction, rect) {
  const f = Math.min(1, Math.max(0, Number.isFinite(fraction) ? fraction : 0.5));
  const split = rect.x + f * rect.w;
  return { x: split, y: rect.y, w: rect.x + rect.w - split, h: rect.h };
}

/**
 * A key of the part of a node output this extension draws: the same output reaches the node twice when both the
 * node's onExecuted and the "executed" event fire (classic canvas), once when only the event does (Nodes 2.0).
 * null when the output has nothing of ours.
 */
export function outputKey(output) {
  if (output === null || typeof output !== "object") return null;
  const ours = {};
  for (const k of [MASK_KEY, COMPARE_KEY]) if (output[k] !== undefined) ours[k] = output[k];
  return Object.keys(ours).length ? JSON.stringify(ours) : null;
}

/**
 * Node ids an "executed" event may name, most specific first: display_node (what the UI shows), node, and for
 * a node inside a subgraph ("outer:inner") its own id in that subgraph.
 */
export function executedNodeIds(detail) {
  const ids = [];
  for (const v of [detail?.display_node, detail?.node]) {
    if (v === undefined || v === null || v === "") continue;
    const s = String(v);
    for (const id of [s, s.split(":").pop()]) if (!ids.includes(id)) ids.push(id);
  }
  return ids;
}

/** The text of a "sae_concept_eraser.warning" event, or null when malformed. */
export function warningText(detail) {
  const t = detail?.text;
  return typeof t === "string" && t.trim() ? t.trim() : null;
}
