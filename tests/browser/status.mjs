// /status in Chromium: the page asks for an operator's API key, says why a
// tenant's key is refused (403), then with the operator's key shows
// /status.json and refreshes itself. Saves a screenshot; reports the tiles
// and tables as shown, console errors and requests.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { distinctColours, env, launch, report } from './lib.mjs';

const proxy = env('DASHCACHE_PROXY');
const key = env('DASHCACHE_KEY');
const tenantKey = env('DASHCACHE_TENANT_KEY');
const shots = env('DASHCACHE_SCREENSHOTS');
const { context, seen, close } = await launch();
const findings = {};
try {
  const page = await context.newPage();
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  await page.goto(`${proxy}/status`);
  await page.locator('#key-form').waitFor({ state: 'visible', timeout: 30000 });
  findings.askedForKey = true;
  // A tenant's key: refused, and the page says why.
  await page.locator('#key').fill(tenantKey);
  await page.locator('#key-form button').click();
  await page.waitForFunction(() => document.getElementById('key-error').textContent !== '', null, { timeout: 30000 });
  findings.tenantKeyError = await page.locator('#key-error').innerText();
  findings.tenantKeyFormShown = await page.locator('#key-form').isVisible();
  await page.locator('#key').fill(key);
  await page.locator('#key-form button').click();
  await page.waitForFunction(() => Number(document.body.dataset.updates || 0) >= 1, null, { timeout: 30000 });
  // It refreshes by itself.
  await page.waitForFunction(() => Number(document.body.dataset.updates || 0) >= 2, null, { timeout: 60000 });
  findings.updates = Number(await page.evaluate(() => document.body.dataset.updates));
  const text = async (sel) => (await page.locator(sel).innerText()).trim();
  for (const id of ['hit-ratio', 'rps', 'in-flight', 'computations', 'queue', 'redis']) {
    findings[id] = await text(`#${id}`);
  }
  const rows = async (id) => page.locator(`#${id} tbody tr`).evaluateAll(
    (trs) => trs.map((tr) => [...tr.cells].map((td) => td.innerText.trim())));
  for (const id of ['by-cache', 'replicas', 'miss-queue', 'tiers', 'popular', 'warmup']) {
    findings[id] = await rows(id);
  }
  findings.chartPaths = await page.locator('#chart svg path').count();
  const png = await page.screenshot({ fullPage: true });
  writeFileSync(join(shots, 'status.png'), png);
  findings.screenshotColours = await distinctColours(context, png);
  findings.requests = requests;
} finally {
  findings.consoleErrors = seen.consoleErrors;
  findings.pageErrors = seen.pageErrors;
  findings.offMachine = seen.offMachine;
  await close();
}
report(findings);
