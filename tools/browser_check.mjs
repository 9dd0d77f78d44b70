// Headless Chromium against a running ComfyUI (driven by tools/browser_check.py, which passes a JSON job file):
// load every example workflow into the real frontend, report missing nodes / widget mismatches / page errors,
// save the frontend's own API conversion, screenshot each graph, then deliver real Mask Preview and Compare
// payloads as "executed" events and drive the scrubber and the slider with keyboard and mouse.
import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";

const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const require = createRequire(path.join(job.playwright_dir, "noop.js"));
const { chromium } = require("playwright-core");

const report = { workflows: {}, behaviour: {}, page_errors: [], console_errors: [] };
class LiveFailed extends Error {}
const shot = (name) => path.join(job.shots, name);

// a fresh profile per run (launchPersistentContext owns --user-data-dir)
const browser = await chromium.launchPersistentContext(job.profile, {
  executablePath: job.chromium,
  headless: true,
  viewport: { width: 1600, height: 1100 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => report.page_errors.push(`${e}\n${(e.stack ?? "").split("\n").slice(0, 6).join("\n")}`));
  page.on("response", (r) => { if (r.status() >= 400) report.console_errors.push(`${r.status()} ${r.url()}`); });
  page.on("console", (m) => { if (m.type() === "error") report.console_errors.push(m.text()); });
  await page.goto(job.url, { waitUntil: "domcontentloaded", timeout: 120000 });
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.SAEMaskPreview,
    null, { timeout: 120000 });
  await page.evaluate(async () => {
    const { app } = window.comfyAPI.app;
    // no first-run tours or template dialogs over the canvas
    for (const [k, v] of [["Comfy.TutorialCompleted", true], ["Comfy.Workflow.ShowMissingModelsWarning", true],
      ["Comfy.Minimap.Visible", false], ["LiteGraph.Canvas.MinFontSizeForLOD", 1]]) {
      try { await app.extensionManager.setting.set(k, v); } catch { /* older frontends */ }
    }
  });
  const extensionLoaded = await page.evaluate(() => window.comfyAPI.app.app.extensions.some((e) => e.name === "sae_concept_eraser.previews"));
  report.extension_loaded = extensionLoaded;
  report.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);

  // the renderer: Nodes 2.0 (Vue nodes) or the classic canvas, by the frontend's own setting
  report.vue_nodes_requested = Boolean(job.vue_nodes);
  report.vue_nodes_active = await page.evaluate(async (on) => {
    const { app } = window.comfyAPI.app;
    try { await app.extensionManager.setting.set("Comfy.VueNodes.Enabled", on); } catch { return false; }
    await new Promise((r) => setTimeout(r, 500));
    return Boolean(app.extensionManager.setting.get("Comfy.VueNodes.Enabled"));
  }, Boolean(job.vue_nodes));

  // template browser: the pack's templates as listed, and each thumbnail at the URL the frontend builds for a
  // custom-node template (api.apiURL(`/workflow_templates/<module>/<name>.jpg`))
  const templates = await page.evaluate(async (module) => {
    const { api } = window.comfyAPI.api;
    const listed = (await (await fetch(api.apiURL("/workflow_templates"))).json())[module] ?? [];
    const thumbnails = {};
    for (const name of listed) {
      const r = await fetch(api.apiURL(`/workflow_templates/${module}/${name}.jpg`));
      const b = new Uint8Array(await r.arrayBuffer());
      thumbnails[name] = { status: r.status, type: r.headers.get("content-type"), jpeg: b[0] === 0xff && b[1] === 0xd8 };
    }
    return { listed, thumbnails };
  }, job.pack_module);
  report.templates_listed = templates.listed;
  report.thumbnails = templates.thumbnails;
  try {
    await page.evaluate(async () => {
      const { app } = window.comfyAPI.app;
      await app.extensionManager.command.execute("Comfy.BrowseTemplates");
    });
    await page.waitForTimeout(1500);
    const label = page.getByText(job.pack_module, { exact: false }).first();
    if (await label.count()) { await label.click({ timeout: 3000 }).catch(() => {}); }
    await page.waitForTimeout(2000);
    await page.screenshot({ path: shot("templates_browser.png") });
  } catch (e) {
    report.console_errors.push(`template browser: ${e}`);
  }
  await page.keyboard.press("Escape");
  await page.waitForTimeout(300);

  for (const [name, file] of Object.entries(job.workflows)) {
    const wf = JSON.parse(fs.readFileSync(file, "utf8"));
    await page.keyboard.press("Escape");
    const result = await page.evaluate(async (wf) => {
      const { app } = window.comfyAPI.app;
      const LG = window.LiteGraph;
      await app.loadGraphData(structuredClone(wf), true, true, wf.id ? undefined : "x");
      await new Promise((r) => setTimeout(r, 800));
      const missing = wf.nodes.filter((n) => !LG.registered_node_types[n.type]).map((n) => n.type);
      const widgetErrors = [];
      for (const n of wf.nodes) {
        const node = app.graph.getNodeById(n.id);
        if (!node) { widgetErrors.push(`node ${n.id} not created`); continue; }
        if (node.has_errors) widgetErrors.push(`node ${n.id} (${n.type}) has_errors`);
        const values = (node.widgets ?? []).filter((w) => w.serialize !== false).map((w) => w.value);
        if (JSON.stringify(values) !== JSON.stringify(n.widgets_values ?? [])) {
          widgetErrors.push(`node ${n.id} (${n.type}) widgets ${JSON.stringify(values)} != file ${JSON.stringify(n.widgets_values)}`);
        }
      }
      const saved = app.graph.serialize();
      const prompt = await app.graphToPrompt();
      const dialogs = [...document.querySelectorAll(".p-dialog")].map((d) => d.textContent.slice(0, 300));
      const panels = [...document.querySelectorAll("[data-sae-widget]")].map((d) => d.dataset.saeWidget);
      // the extension touches only this pack's Mask Preview and Compare
      const touched = app.graph._nodes.filter((n) => "saeView" in n || n.widgets?.some((w) => w.type === "sae_panel"))
        .map((n) => n.type);
      // fit the whole graph into view for the screenshot (titles sit 30 units above a node's pos)
      const xs = wf.nodes.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]);
      const ys = wf.nodes.flatMap((n) => [n.pos[1] - 30, n.pos[1] + n.size[1]]);
      const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.92 });
      app.canvas.setDirty(true, true);
      return { missing, widgetErrors, dialogs, panels, touched, nodes: saved.nodes.length, links: saved.links.length,
        api: prompt.output };
    }, wf);
    await page.waitForTimeout(500);
    // the canvas without the side bar and the top bar
    await page.screenshot({ path: shot(`${name}.png`), clip: { x: 64, y: 80, width: 1536, height: 1020 } });
    report.workflows[name] = result;
  }

  if (job.vue_nodes && !Object.values(report.workflows).some((r) => r.panels.length)) {
    report.live_skipped = "the renderer put no panel on the page in any workflow";
    throw new LiveFailed(); // nothing to drive: do not wait for a run nobody can see
  }

  // behaviour: a real run. A tiny SD1 graph (test-only helper nodes + this pack's nodes) is loaded and queued from
  // the frontend; the server's "executed" messages carry the real Mask Preview / Compare payloads.
  const live = JSON.parse(fs.readFileSync(job.live_workflow, "utf8"));
  const ids = Object.fromEntries(["SAEMaskPreview", "SAECompare"].map((t) => [t, live.nodes.find((n) => n.type === t).id]));
  await page.evaluate(async (wf) => {
    const { app } = window.comfyAPI.app;
    await app.loadGraphData(structuredClone(wf));
    await new Promise((r) => setTimeout(r, 500));
    const mp = app.graph.getNodeById(wf.nodes.find((n) => n.type === "SAEMaskPreview").id);
    app.canvas.ds.fitToBounds([mp.pos[0] - 20, mp.pos[1] - 40, 840, 700], { zoom: 0.95 });
    app.canvas.setDirty(true, true);
    await app.queuePrompt(0, 1);
  }, live);
  // the run's results reach the panels (their state), and the panels are on the page (the renderer shows them)
  const viewState = () => page.evaluate((ids) => {
    const { app } = window.comfyAPI.app;
    const out = {};
    for (const [t, id] of Object.entries(ids)) {
      const node = app.graph.getNodeById(id);
      const root = node?.saeView?.panel.root;
      out[t] = { view: Boolean(node?.saeView), drawn: root?.dataset.step ?? root?.dataset.fraction ?? null,
        onPage: Boolean(root?.isConnected), visible: Boolean(root && root.getBoundingClientRect().height > 0) };
    }
    return out;
  }, ids);
  try {
    await page.waitForFunction(() => document.querySelector('[data-sae-widget="sae_step_scrubber"]')?.dataset.step !== undefined
      && document.querySelector('[data-sae-widget="sae_compare_slider"]')?.dataset.fraction !== undefined, null, { timeout: 420000 });
  } catch (e) {
    report.live_failed = { error: String(e).slice(0, 300), views: await viewState() };
    await page.screenshot({ path: shot("live_run_failed.png") });
    throw new LiveFailed();
  }
  report.live_views = await viewState();
  await page.waitForTimeout(500);
  await page.screenshot({ path: shot("live_run.png") });
  const canvasHash = (panel) => panel.locator("canvas").evaluate((c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let h = 0;
    for (let i = 0; i < d.length; i += 7) h = (h * 31 + d[i]) >>> 0;
    return `${c.width}x${c.height}:${h}`;
  });
  {
    const panel = page.locator('[data-sae-widget="sae_step_scrubber"]');
    const range = panel.locator('input[type="range"]');
    const count = Number(await range.getAttribute("max")) + 1;
    await range.focus();
    await page.keyboard.press("Home");
    const states = [];
    for (let k = 0; k < count; k++) {
      const st = await panel.evaluate((d) => ({ step: d.dataset.step, caption: d.querySelector("span").textContent }));
      states.push({ ...st, hash: await canvasHash(panel) });
      await page.screenshot({ path: shot(`scrubber_step${k}.png`) });
      await panel.screenshot({ path: shot(`scrubber_panel_step${k}.png`) });
      await page.keyboard.press("ArrowRight");
    }
    report.behaviour.SAEMaskPreview = { states };
  }
  {
    const panel = page.locator('[data-sae-widget="sae_compare_slider"]');
    const box = await panel.locator("canvas").boundingBox();
    const y = box.y + box.height / 2;
    await page.mouse.move(box.x + box.width * 0.5, y);
    await page.mouse.down();
    const states = [];
    for (const [k, f] of [[0, 0.15], [1, 0.5], [2, 0.85]]) {
      await page.mouse.move(box.x + box.width * f, y, { steps: 5 });
      const st = await panel.evaluate((d) => ({ fraction: d.dataset.fraction, caption: d.querySelector("span").textContent }));
      states.push({ ...st, pointer: f, hash: await canvasHash(panel) });
      await page.screenshot({ path: shot(`slider_${k}.png`) });
      await panel.screenshot({ path: shot(`slider_panel_${k}.png`) });
    }
    await page.mouse.up();
    report.behaviour.SAECompare = { states };
  }
  // remove the nodes: their listeners go with them (each panel's AbortController)
  for (const [t, id] of Object.entries(ids)) {
    report.behaviour[t].removed = await page.evaluate((id) => {
      const { app } = window.comfyAPI.app;
      const node = app.graph.getNodeById(id);
      const panel = node.saeView.panel;
      app.graph.remove(node);
      return { aborted: panel.signal.aborted, viewCleared: node.saeView === null };
    }, id);
  }
} catch (e) {
  if (!(e instanceof LiveFailed)) throw e; // reported: the panels never showed the run (see live_failed)
} finally {
  await browser.close();
}
fs.writeFileSync(path.join(job.shots, "report.json"), JSON.stringify(report, null, 1));
