// /status: renders /status.json every few seconds. It needs an operator's
// API key (a tier with operator = true): the page asks for one (again after a
// 401 or 403, showing why) and keeps it for this tab only
// (sessionStorage), sending it as X-API-Key. Everything is drawn here: the
// chart is inline SVG, nothing loads from elsewhere.
'use strict';

const REFRESH_MS = 5000;
const $ = (id) => document.getElementById(id);
let updates = 0;

const pct = (x) => (x === null || x === undefined ? '–' : `${(x * 100).toFixed(1)} %`);
const num = (x) => (x === null || x === undefined ? '–' : Number(x).toLocaleString('en'));
const when = (ms) => (ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 19) : '–');

function cell(row, text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function fill(id, rows, empty) {
  const body = $(id).querySelector('tbody');
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = body.insertRow();
    const td = document.createElement('td');
    td.colSpan = $(id).querySelectorAll('th').length;
    td.className = 'empty';
    td.textContent = empty;
    tr.appendChild(td);
    return;
  }
  for (const values of rows) {
    const tr = body.insertRow();
    for (const v of values) {
      if (Array.isArray(v)) cell(tr, v[0], v[1]);
      else cell(tr, String(v), typeof v === 'number' ? 'num' : '');
    }
  }
}

// Requests/s (left scale) and hit ratio (0–100 %) over the samples, as SVG.
function chart(series) {
  const W = 1000, H = 200, L = 44, R = 44, T = 10, B = 22;
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  const el = (name, attrs, text) => {
    const e = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  el('line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B });
  el('line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B });
  const maxRps = Math.max(1, ...series.map((p) => p.requests_per_s));
  el('text', { x: 4, y: T + 10 }, maxRps.toFixed(maxRps < 10 ? 1 : 0));
  el('text', { x: 4, y: H - B }, '0');
  el('text', { x: W - R + 4, y: T + 10 }, '100%');
  el('text', { x: W - R + 4, y: H - B }, '0%');
  if (series.length > 0) {
    const t0 = series[0].at_ms, t1 = series[series.length - 1].at_ms;
    const x = (t) => L + (t1 === t0 ? (W - L - R) : ((t - t0) / (t1 - t0)) * (W - L - R));
    const y = (v) => H - B - v * (H - B - T);
    const line = (points) => points.map(([px, py], i) => `${i ? 'L' : 'M'}${px.toFixed(1)},${py.toFixed(1)}`).join('');
    el('path', { class: 'rps', d: line(series.map((p) => [x(p.at_ms), y(p.requests_per_s / maxRps)])) });
    const hits = series.filter((p) => p.hit_ratio !== null);
    if (hits.length) el('path', { class: 'hits', d: line(hits.map((p) => [x(p.at_ms), y(p.hit_ratio)])) });
    const mins = Math.round((t1 - t0) / 60000);
    el('text', { x: L, y: H - 6 }, mins > 0 ? `${mins} min ago` : 'start');
    el('text', { x: W - R - 30, y: H - 6 }, 'now');
  }
  $('chart').replaceChildren(svg);
}

// Requests/s and hit ratio over the intervals that end in the last minute.
function lastMinute(series, now) {
  const recent = series.filter((p) => p.at_ms > now - 60000);
  let requests = 0, secs = 0;
  const byCache = { HIT: 0, STALE: 0, MISS: 0, COALESCED: 0 };
  for (const p of recent) {
    const dt = (p.at_ms - p.from_ms) / 1000;
    secs += dt;
    requests += p.requests_per_s * dt;
    for (const k of Object.keys(byCache)) byCache[k] += p.by_cache[k];
  }
  const answered = byCache.HIT + byCache.STALE + byCache.MISS + byCache.COALESCED;
  return {
    rps: secs > 0 ? requests / secs : null,
    ratio: answered ? (byCache.HIT + byCache.STALE) / answered : null,
    byCache,
  };
}

function render(s) {
  const minute = lastMinute(s.series, s.now_ms);
  $('hit-ratio').textContent = pct(minute.ratio ?? s.cache.hit_ratio);
  $('rps').textContent = minute.rps === null ? '–' : minute.rps.toFixed(1);
  $('in-flight').textContent = num(s.requests.in_flight);
  $('computations').textContent = `${num(s.computations.in_flight)} / ${num(s.computations.waiting)}`;
  $('queue').textContent = num(s.computations.miss_queue_waiting);
  const redis = $('redis');
  if (s.redis.configured === false) {
    // One host, no [redis]: answers live in the proxy's memory.
    redis.textContent = 'none (in process)';
    redis.className = 'value ok';
    redis.title = `answers in memory: ${s.redis.memory_bytes} of ${s.redis.memory_max_bytes} bytes`;
  } else {
    redis.textContent = s.redis.ok ? 'up' : 'down';
    redis.className = `value ${s.redis.ok ? 'ok' : 'bad'}`;
    redis.title = s.redis.error || `${s.redis_errors} errors since start`;
  }
  chart(s.series);
  fill('by-cache', Object.entries(s.cache.by_cache).map(([k, v]) => [k, v, minute.byCache[k]]), 'none');
  fill('replicas', s.clickhouse.replicas.map((r) => [r.url, r.up ? ['up', 'ok'] : ['ejected', 'bad'], r.in_flight]), 'none');
  fill('miss-queue', Object.entries(s.computations.miss_queue), 'none');
  fill('tiers', Object.entries(s.api_keys_per_tier), 'no keys');
  if (s.popular.error) fill('popular', [[['Redis: ' + s.popular.error, 'bad'], '', '', '', '']], '');
  else fill('popular', s.popular.answers.map((a) => [a.query, a.tenant || '–', a.format, a.params || '–', a.requests]), 'no requests counted yet this hour');
  if (s.warmup.error) fill('warmup', [[['control store: ' + s.warmup.error, 'bad'], '', '', '', '', '', '', '', '']], '');
  else fill('warmup', s.warmup.runs.map((r) => [
    r.job, r.host, when(r.started_ms), r.ended_ms ? `${((r.ended_ms - r.started_ms) / 1000).toFixed(1)} s` : 'running',
    [r.outcome, r.outcome === 'ok' ? 'ok' : (r.outcome === 'running' ? '' : 'bad')], r.keys_warmed, r.keys_skipped, r.keys_failed, r.error || '',
  ]), 'no runs recorded');
  updates += 1;
  document.body.dataset.updates = String(updates);
  $('updated').textContent = `updated ${when(s.now_ms)} UTC, every ${REFRESH_MS / 1000} s`;
}

async function refresh() {
  const key = sessionStorage.getItem('dashcache-key');
  const headers = key ? { 'X-API-Key': key } : {};
  try {
    const r = await fetch('/status.json', { headers, cache: 'no-store' });
    if (r.status === 401 || r.status === 403) {
      $('main').hidden = true;
      $('key-form').hidden = false;
      $('key-error').textContent = key ? (await r.json()).detail : '';
      $('updated').textContent = 'needs an operator\'s API key';
      return;
    }
    if (!r.ok) throw new Error(`status ${r.status}`);
    $('key-form').hidden = true;
    $('main').hidden = false;
    render(await r.json());
  } catch (err) {
    $('updated').textContent = `cannot reach the proxy (${err.message}); retrying`;
  }
}

$('key-form').addEventListener('submit', (e) => {
  e.preventDefault();
  sessionStorage.setItem('dashcache-key', $('key').value.trim());
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
