// A dashboard page on another origin than the proxy's, in Chromium: reads an
// answer and its X-Cache, loads 10 panels at once (and again), is blocked on
// an origin [cors] does not allow, and reads a 422's and a 429's body.
// Reports what the page saw and the proxy's CORS counters around each step;
// tests/it/browser.rs asserts.
import { env, launch, metric, report, serve } from './lib.mjs';

const proxy = env('DASHCACHE_PROXY');
const key = env('DASHCACHE_KEY');
const tinyKey = env('DASHCACHE_TINY_KEY');
const blank = '<!doctype html><meta charset="utf-8"><title>dashboard</title><body>panels</body>';
const page = await serve(Number(env('DASHCACHE_PAGE_PORT')), { pages: { '/': blank } });
const other = await serve(Number(env('DASHCACHE_OTHER_PORT')), { pages: { '/': blank } });
const { context, seen, close } = await launch();

const counters = async () => {
  const get = (kind, result) => metric(proxy, `dashcache_cors_requests_total{kind="${kind}",result="${result}"}`, key);
  return {
    preflightAllowed: await get('preflight', 'allowed'),
    preflightRefused: await get('preflight', 'refused'),
    actualAllowed: await get('actual', 'allowed'),
    actualRefused: await get('actual', 'refused'),
  };
};
const delta = (before, after) => Object.fromEntries(Object.keys(after).map((k) => [k, after[k] - before[k]]));

// Runs `fn(proxy, ...args)` in the page and the counters' change while it ran.
const step = async (tab, fn, ...args) => {
  const before = await counters();
  const seenByPage = await tab.evaluate(fn, [proxy, ...args]);
  return { page: seenByPage, proxy: delta(before, await counters()) };
};

const findings = {};
try {
  const tab = await context.newPage();
  await tab.goto(`http://127.0.0.1:${env('DASHCACHE_PAGE_PORT')}/`);

  findings.one = await step(tab, async ([proxy, key]) => {
    const r = await fetch(`${proxy}/v1/query/revenue?from=today-7d&to=today&granularity=day`, {
      headers: { 'X-API-Key': key },
    });
    const body = await r.json();
    return {
      status: r.status,
      xCache: r.headers.get('x-cache'),
      rateRemaining: r.headers.get('ratelimit-remaining'),
      rows: body.data.length,
    };
  }, key);

  // A dashboard: 10 panels, each its own URL, loaded at once, three times.
  const panels = async ([proxy, key]) => {
    const urls = Array.from({ length: 10 }, (_, i) =>
      `${proxy}/v1/query/top_countries?from=today-${i + 2}d&to=today&limit=5`);
    const replies = await Promise.all(urls.map((u) => fetch(u, { headers: { 'X-API-Key': key } })));
    return Promise.all(replies.map(async (r) => ({ status: r.status, xCache: r.headers.get('x-cache'), rows: (await r.json()).data.length })));
  };
  findings.panels = [];
  for (let load = 0; load < 3; load++) findings.panels.push(await step(tab, panels, key));

  // Streamed panels the browser does not keep (exports are no-store), so
  // every load reaches the proxy: the preflights' answers are reused.
  const exports = async ([proxy, key]) => {
    const urls = Array.from({ length: 10 }, (_, i) =>
      `${proxy}/v1/export/events?from=today-1d&to=today&event=${['page_view', 'click', 'signup', 'purchase'][i % 4]}&plan=${['free', 'pro', 'enterprise'][i % 3]}&format=ndjson`);
    const replies = await Promise.all(urls.map((u) => fetch(u, { headers: { 'X-API-Key': key } })));
    return Promise.all(replies.map(async (r) => ({ status: r.status, text: (await r.text()).slice(0, 200) })));
  };
  findings.exports = [];
  for (let load = 0; load < 3; load++) findings.exports.push(await step(tab, exports, key));

  // The same page served from an origin [cors] does not allow.
  const blocked = await context.newPage();
  await blocked.goto(`http://127.0.0.1:${env('DASHCACHE_OTHER_PORT')}/`);
  findings.refused = await step(blocked, async ([proxy, key]) => {
    try {
      const r = await fetch(`${proxy}/v1/query/revenue?from=today-7d&to=today&granularity=day`, {
        headers: { 'X-API-Key': key },
      });
      return { status: r.status, body: await r.text() };
    } catch (err) {
      return { error: `${err.name}: ${err.message}` };
    }
  }, key);
  await blocked.close();

  findings.invalid = await step(tab, async ([proxy, key]) => {
    const r = await fetch(`${proxy}/v1/query/revenue?from=today-7d&to=today&granularity=week`, {
      headers: { 'X-API-Key': key },
    });
    return { status: r.status, body: await r.json() };
  }, key);

  findings.limited = await step(tab, async ([proxy, key]) => {
    const seen = [];
    for (let i = 0; i < 10; i++) {
      const r = await fetch(`${proxy}/v1/query/active_users?window=hour`, { headers: { 'X-API-Key': key } });
      seen.push(r.status);
      if (r.status === 429) {
        return { statuses: seen, retryAfter: r.headers.get('retry-after'), body: await r.json() };
      }
    }
    return { statuses: seen };
  }, tinyKey);
} finally {
  findings.consoleErrors = seen.consoleErrors;
  findings.pageErrors = seen.pageErrors;
  findings.offMachine = seen.offMachine;
  await close();
  page.close();
  other.close();
}
report(findings);
