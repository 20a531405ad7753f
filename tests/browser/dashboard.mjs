// examples/dashboard in Chromium, served from its own origin: the revenue
// chart (then filtered by a country, then by hour) and the top-countries
// table as drawn, X-Cache per panel, a streamed export (how much had arrived
// when the first rows were drawn) and a cancelled one (the ClickHouse query
// before and after Cancel, from system.processes). Reports; the test asserts.
import { writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { distinctColours, env, launch, report, serve } from './lib.mjs';

const proxy = env('DASHCACHE_PROXY');
const key = env('DASHCACHE_KEY');
const clickhouse = env('DASHCACHE_CLICKHOUSE');
const shots = env('DASHCACHE_SCREENSHOTS');
const port = Number(env('DASHCACHE_PAGE_PORT'));
const site = await serve(port, { dir: resolve('../../examples/dashboard') });
const { context, seen, close } = await launch();

// Export queries running in ClickHouse now.
const running = async () => {
  const sql = "SELECT count() FROM system.processes WHERE query LIKE '%FROM demo.events%' AND query NOT LIKE '%system.processes%'";
  const r = await fetch(`${clickhouse}/?query=${encodeURIComponent(sql)}`);
  return Number((await r.text()).trim());
};

const findings = {};
try {
  const page = await context.newPage();
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  await page.goto(`http://127.0.0.1:${port}/#proxy=${encodeURIComponent(proxy)}&key=${encodeURIComponent(key)}`);
  const loads = (name, n) => page.waitForFunction(
    ([name, n]) => Number(document.body.dataset[name] || 0) >= n, [name, n], { timeout: 60000 });
  const bars = () => page.locator('#revenue-chart rect').evaluateAll(
    (rects) => rects.map((r) => ({ t: r.dataset.t, revenue: Number(r.dataset.revenue), events: Number(r.dataset.events) })));
  const panel = async () => ({
    bars: await bars(),
    xCache: (await page.locator('#revenue-cache').innerText()).trim(),
    range: (await page.locator('#revenue-range').innerText()).trim(),
  });

  await loads('revenueLoads', 1);
  await loads('topLoads', 1);
  findings.fragmentCleared = !(await page.evaluate(() => location.hash));
  findings.revenue = await panel();
  findings.top = {
    xCache: (await page.locator('#top-cache').innerText()).trim(),
    rows: await page.locator('#top-table tbody tr').evaluateAll((trs) => trs.map((tr) => ({
      country: tr.cells[0].innerText,
      revenue: Number(tr.cells[1].innerText.replace(/,/g, '')),
      events: Number(tr.cells[2].innerText),
    }))),
  };
  const png = await page.screenshot({ fullPage: false });
  writeFileSync(join(shots, 'dashboard.png'), png);
  findings.screenshotColours = await distinctColours(context, png);

  const country = findings.top.rows[0].country;
  findings.country = country;
  await page.locator('#country').selectOption(country);
  await loads('revenueLoads', 2);
  findings.byCountry = await panel();
  await page.locator('#granularity').selectOption('hour');
  await loads('revenueLoads', 3);
  findings.byHour = await panel();
  // Back to the first view: now a hit.
  await page.locator('#granularity').selectOption('day');
  await page.locator('#country').selectOption('');
  await loads('revenueLoads', 5);
  findings.again = await panel();

  // A multi-second export: rows drawn as they arrive.
  await page.locator('#export-days').selectOption('30');
  await page.locator('#export-start').click();
  await page.waitForFunction(() => window.exportStats && window.exportStats.state !== 'streaming', null, { timeout: 240000 });
  findings.export = await page.evaluate(() => window.exportStats);
  findings.exportShown = await page.locator('#export-table tbody tr').count();

  // Cancel one while ClickHouse still runs it.
  await page.locator('#export-days').selectOption('90');
  await page.locator('#export-start').click();
  await page.waitForFunction(() => window.exportStats && window.exportStats.rows > 0, null, { timeout: 60000 });
  findings.runningBeforeCancel = await running();
  await page.locator('#export-cancel').click();
  await page.waitForFunction(() => window.exportStats.state !== 'streaming', null, { timeout: 60000 });
  findings.cancelled = await page.evaluate(() => window.exportStats);
  let after = await running();
  for (let i = 0; i < 300 && after > 0; i++) {
    await new Promise((r) => setTimeout(r, 100));
    after = await running();
  }
  findings.runningAfterCancel = after;
  findings.status = (await page.locator('#export-status').innerText()).trim();
  findings.error = (await page.locator('#error').isVisible()) ? await page.locator('#error').innerText() : null;
  findings.requests = requests;
} finally {
  findings.consoleErrors = seen.consoleErrors;
  findings.pageErrors = seen.pageErrors;
  findings.offMachine = seen.offMachine;
  await close();
  site.close();
}
report(findings);
