// Drives the demo page in headless Chromium: a message typed in pane A must
// appear in pane B, delivered by the other node; a topic message reaches both
// panes; the live view lists both nodes. Prints "ok demo" on success.
//
// Usage: node demo.mjs '{"url": "http://127.0.0.1:8080/", "nodes": ["a", "b"], "screenshot": "out.png"}'

import { chromium } from "playwright-core";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

// Called as `node demo.mjs demo <config>`, like the STOMP scenarios.
const config = JSON.parse(process.argv[3]);
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TIMEOUT = 20_000;

const browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "pgrelay-chromium-")), {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
  ],
});

function fail(message) {
  throw new Error(message);
}

try {
  const page = browser.pages()[0] ?? (await browser.newPage());
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(config.url);

  const paneA = page.locator("#pane-a");
  const paneB = page.locator("#pane-b");
  // Both clients connect on their own, to different nodes.
  await paneA.locator('.status[data-state="connected"]').waitFor();
  await paneB.locator('.status[data-state="connected"]').waitFor();
  const nodeA = await paneA.getAttribute("data-node");
  const nodeB = await paneB.getAttribute("data-node");
  if (nodeA !== config.nodes[0]) fail(`pane A is on ${nodeA}, expected ${config.nodes[0]}`);
  if (nodeB !== config.nodes[1]) fail(`pane B is on ${nodeB}, expected ${config.nodes[1]}`);

  // Typed in pane A (sent through the page's node) → shown in pane B,
  // delivered by B's node.
  const text = `hello from A ${Date.now()}`;
  await paneA.locator("input.text").fill(text);
  await paneA.locator("button.send").click();
  const received = paneB.locator("li.message", { hasText: text });
  await received.waitFor();
  const deliveredBy = await received.getAttribute("data-node");
  if (deliveredBy !== nodeB) fail(`delivered by ${deliveredBy}, expected ${nodeB}`);
  if (!(await received.locator(".via").innerText()).includes(nodeB)) fail("the message does not say which node delivered it");
  if ((await paneA.locator("li.message", { hasText: text }).count()) !== 0) fail("pane A got bob's message");

  // A topic message from pane B reaches both panes, each through its node.
  const topicText = `to the topic ${Date.now()}`;
  await paneB.locator("input.text").fill(topicText);
  await paneB.locator("button.publish").click();
  await paneA.locator("li.message", { hasText: topicText }).waitFor();
  await paneB.locator("li.message", { hasText: topicText }).waitFor();

  // The live view shows both nodes and both connections.
  for (const node of config.nodes) {
    await page.locator("#nodes tbody tr", { hasText: node }).first().waitFor();
  }
  await page.locator("#connections tbody tr", { hasText: "alice" }).first().waitFor();
  await page.locator("#connections tbody tr", { hasText: "bob" }).first().waitFor();

  await page.screenshot({ path: config.screenshot, fullPage: true });
  if (errors.length) fail(`errors on the page: ${errors.join("; ")}`);
  console.log(`ok demo: "${text}" typed in pane A (on ${nodeA}) was delivered in pane B by ${deliveredBy}`);
} finally {
  await browser.close();
}
