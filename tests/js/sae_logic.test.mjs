// node --test tests/js/   (outside js/, the folder ComfyUI serves to browsers)
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  COMPARE_KEY, MASK_KEY, PayloadError, checkRef, clipRect, fitRect, isOurNodeType, parseComparePayload,
  parseMaskPayload, sliderFraction, stepAfterKey, stepIndex, stepLabel, viewPath,
} from "../../js/sae_logic.js";
import * as L from "../../js/sae_logic.js";

const ref = (filename, type = "temp", subfolder = "") => ({ filename, subfolder, type });

function maskEntry(overrides = {}) {
  return {
    image: 0, width: 40, height: 24, grid: [3, 5], steps: [0, 1, 2], base: ref("b.png"),
    masks: [ref("m0.png"), ref("m1.png"), ref("m2.png")], branch: "cond", show: "mask", truncated: false,
    ...overrides,
  };
}

test("only SAE node types are ours", () => {
  assert.equal(isOurNodeType("SAEMaskPreview"), true);
  assert.equal(isOurNodeType("KSampler"), false);
  assert.equal(isOurNodeType("PreviewImage"), false);
  assert.equal(isOurNodeType(undefined), false);
});

test("viewPath encodes every field", () => {
  assert.equal(viewPath(ref("a b&c.png", "temp", "x y")), "/view?filename=a+b%26c.png&subfolder=x+y&type=temp");
});

test("checkRef refuses paths and unknown folders", () => {
  assert.throws(() => checkRef(ref("../x.png"), "w"), { name: "PayloadError", message: /w: filename "\.\.\/x\.png" is not a plain file name/ });
  assert.throws(() => checkRef(ref("x.png", "temp", "../up"), "w"), /subfolder "\.\.\/up" is not a relative folder/);
  assert.throws(() => checkRef(ref("x.png", "models"), "w"), /type "models" is not one of temp, output, input/);
  assert.throws(() => checkRef(null, "w"), PayloadError);
});

test("mask payload parses, keeps order, defaults", () => {
  const out = parseMaskPayload({ images: [], [MASK_KEY]: [maskEntry(), maskEntry({ image: 1, steps: [7], masks: [ref("q.png")], branch: "uncond" })] });
  assert.equal(out.length, 2);
  assert.deepEqual(out[0].steps, [0, 1, 2]);
  assert.deepEqual(out[0].masks.map((m) => m.filename), ["m0.png", "m1.png", "m2.png"]);
  assert.equal(out[1].branch, "uncond");
  assert.deepEqual(out[1].grid, [3, 5]);
});

test("mask payload absent -> empty, malformed -> specific errors", () => {
  assert.deepEqual(parseMaskPayload({ images: [] }), []);
  assert.deepEqual(parseMaskPayload(undefined), []);
  assert.throws(() => parseMaskPayload({ [MASK_KEY]: "x" }), /sae_mask_steps: expected a list, found string/);
  assert.throws(() => parseMaskPayload({ [MASK_KEY]: [maskEntry({ masks: [ref("m0.png")] })] }),
    /sae_mask_steps\[0\]: 1 masks for 3 steps; expected one per step/);
  assert.throws(() => parseMaskPayload({ [MASK_KEY]: [maskEntry({ grid: [3] })] }), /grid \[3\] is not \[h, w\]/);
  assert.throws(() => parseMaskPayload({ [MASK_KEY]: [maskEntry({ width: 0 })] }), /width\/height 0x24/);
  assert.throws(() => parseMaskPayload({ [MASK_KEY]: [maskEntry({ steps: [0, "1", 2] })] }), /steps must be a list of numbers/);
  assert.throws(() => parseMaskPayload({ [MASK_KEY]: [maskEntry({ base: ref("a/b.png") })] }), /sae_mask_steps\[0\]\.base: filename/);
});

test("compare payload parses 2 or 3 branches only", () => {
  const b = (label) => ({ label, image: ref(`${label}.png`), width: 10, height: 8 });
  assert.deepEqual(parseComparePayload({ [COMPARE_KEY]: [b("a"), b("b")] }).map((x) => x.label), ["a", "b"]);
  assert.equal(parseComparePayload({ [COMPARE_KEY]: [b("a"), b("b"), b("c")] }).length, 3);
  assert.deepEqual(parseComparePayload({}), []);
  assert.throws(() => parseComparePayload({ [COMPARE_KEY]: [b("a")] }), /expected 2 or 3 branches, found 1/);
  assert.throws(() => parseComparePayload({ [COMPARE_KEY]: [b("a"), { ...b("b"), height: 1.5 }] }), /sae_compare\[1\]: width\/height 10x1.5/);
  // a label is data, never markup: it is kept verbatim and rendered with textContent / fillText
  assert.equal(parseComparePayload({ [COMPARE_KEY]: [b("<img src=x onerror=alert(1)>"), b("b")] })[0].label, "<img src=x onerror=alert(1)>");
});

test("step index clamps and rounds", () => {
  assert.equal(stepIndex(2, 4), 2);
  assert.equal(stepIndex(2.6, 4), 3);
  assert.equal(stepIndex(-3, 4), 0);
  assert.equal(stepIndex(99, 4), 3);
  assert.equal(stepIndex("1", 4), 1);
  assert.equal(stepIndex(NaN, 4), 0);
  assert.equal(stepIndex(0, 0), -1);
});

test("keys move the scrubber within range", () => {
  assert.equal(stepAfterKey(0, "ArrowRight", 4), 1);
  assert.equal(stepAfterKey(0, "ArrowLeft", 4), 0);
  assert.equal(stepAfterKey(1, "End", 4), 3);
  assert.equal(stepAfterKey(3, "Home", 4), 0);
  assert.equal(stepAfterKey(2, "PageUp", 30), 12);
  assert.equal(stepAfterKey(2, "a", 4), null);
  assert.equal(stepAfterKey(0, "ArrowRight", 0), null);
});

test("step label names the recorded step key and position", () => {
  const e = parseMaskPayload({ [MASK_KEY]: [maskEntry({ steps: [3, 5, 9] })] })[0];
  assert.equal(stepLabel(e, 1), "step 5 · 2/3 · cond mask");
  assert.equal(stepLabel(e, 10), "step 9 · 3/3 · cond mask");
  assert.equal(stepLabel({ ...e, truncated: true }, 0), "step 3 · 1/3 · cond mask (more not sent)");
  assert.equal(stepLabel({ ...e, steps: [] }, 0), "no recorded steps");
});

for (const [src, box, expected] of [
  [[40, 24], [100, 100], { x: 0, y: 20, w: 100, h: 60 }],
  [[24, 40], [100, 50], { x: 35, y: 0, w: 30, h: 50 }],
  [[10, 10], [0, 50], { x: 0, y: 0, w: 0, h: 0 }],
]) {
  test(`fitRect ${src} in ${box}`, () => {
    assert.deepEqual(fitRect(src[0], src[1], box[0], box[1]), expected);
  });
}

test("slider fraction follows the pointer inside the image and clamps outside", () => {
  const r = { x: 10, y: 0, w: 200, h: 100 };
  assert.equal(sliderFraction(110, r), 0.5);
  assert.equal(sliderFraction(60, r), 0.25);
  assert.equal(sliderFraction(0, r), 0);
  assert.equal(sliderFraction(500, r), 1);
  assert.equal(sliderFraction(5, { x: 0, y: 0, w: 0, h: 0 }), 0.5);
});

test("clip rect is the part right of the divider", () => {
  const r = { x: 10, y: 5, w: 200, h: 100 };
  assert.deepEqual(clipRect(0.25, r), { x: 60, y: 5, w: 150, h: 100 });
  assert.deepEqual(clipRect(0, r), { x: 10, y: 5, w: 200, h: 100 });
  assert.deepEqual(clipRect(1, r), { x: 210, y: 5, w: 0, h: 100 });
  assert.deepEqual(clipRect(-1, r), clipRect(0, r));
  assert.deepEqual(clipRect(NaN, r), clipRect(0.5, r));
});

test("outputKey keys only this pack's payload and ignores others", () => {
  const a = { sae_mask_steps: [{ x: 1 }], images: [{ filename: "a.png" }] };
  const b = { sae_mask_steps: [{ x: 1 }], images: [{ filename: "other.png" }] };
  assert.equal(L.outputKey(a), L.outputKey(b));
  assert.notEqual(L.outputKey(a), L.outputKey({ sae_mask_steps: [{ x: 2 }] }));
  assert.equal(L.outputKey({ images: [] }), null);
  assert.equal(L.outputKey(null), null);
  assert.notEqual(L.outputKey({ sae_compare: [1] }), null);
});

test("executedNodeIds tries the displayed node, the node and a subgraph node's own id", () => {
  assert.deepEqual(L.executedNodeIds({ node: "12", display_node: "12" }), ["12"]);
  assert.deepEqual(L.executedNodeIds({ node: "4:7", display_node: "4:7" }), ["4:7", "7"]);
  assert.deepEqual(L.executedNodeIds({ node: 9 }), ["9"]);
  assert.deepEqual(L.executedNodeIds({}), []);
});

test("warningText accepts only a non-empty string", () => {
  assert.equal(L.warningText({ text: "  x  " }), "x");
  assert.equal(L.warningText({ text: "" }), null);
  assert.equal(L.warningText({ text: 3 }), null);
  assert.equal(L.warningText(null), null);
});
