// /docs in Chromium: Swagger UI renders the proxy's /openapi.json from files
// compiled into the proxy, "Authorize" takes an API key and "Try it out"
// calls a query with it. Saves a screenshot; reports what the page showed,
// console errors and any request for another host.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { distinctColours, env, launch, report } from './lib.mjs';

const proxy = env('DASHCACHE_PROXY');
const key = env('DASHCACHE_KEY');
const shots = env('DASHCACHE_SCREENSHOTS');
const { context, seen, close } = await launch();
const findings = {};
try {
  const page = await context.newPage();
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  await page.goto(`${proxy}/docs`);
  await page.locator('.swagger-ui .info .title').waitFor({ timeout: 30000 });
  findings.title = (await page.locator('.swagger-ui .info .title').innerText()).trim();
  await page.locator('.opblock').first().waitFor();
  findings.operations = await page.locator('.opblock').count();
  const png = await page.screenshot({ fullPage: false });
  writeFileSync(join(shots, 'docs.png'), png);
  findings.screenshotColours = await distinctColours(context, png);

  // Authorize with the key as X-API-Key.
  await page.locator('.auth-wrapper button.authorize').click();
  const scheme = page.locator('.auth-container', { hasText: 'X-API-Key' });
  await scheme.locator('input').fill(key);
  await scheme.locator('button.authorize').click();
  await page.locator('button.btn-done').first().click();

  // Try it out: GET /v1/query/active_users with its defaults.
  const op = page.locator('#operations-queries-query_active_users');
  await op.locator('.opblock-summary').click();
  await op.locator('button.try-out__btn').click();
  await op.locator('button.execute').click();
  const status = op.locator('.live-responses-table tbody .response .response-col_status').first();
  await status.waitFor({ timeout: 30000 });
  findings.tryItOutStatus = (await status.innerText()).trim();
  // The response body and headers as the page shows them.
  findings.tryItOutDetails = await op.locator('.live-responses-table tbody .response .response-col_description').first().innerText();
  findings.requests = requests;
} finally {
  findings.consoleErrors = seen.consoleErrors;
  findings.pageErrors = seen.pageErrors;
  findings.offMachine = seen.offMachine;
  await close();
}
report(findings);
