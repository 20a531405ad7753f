// A dashboard page on its own origin calling dashcache directly: copy it.
//
// Every request carries the API key in X-API-Key, so the browser asks the
// proxy first (a CORS preflight, one per URL, then cached for cors.max_age);
// the proxy's [cors] allowed_origins must list this page's origin. The
// proxy's own headers (X-Cache, X-Time-Range, Retry-After, …) are readable
// because it exposes them. Keep keys out of public pages: see the README,
// "Browser use".
//
// Settings come from the form, or once from the URL fragment
// (#proxy=http://127.0.0.1:8080&key=...), and are kept for this tab only.
'use strict';

const $ = (id) => document.getElementById(id);
const RANGE = 'from=today-14d&to=today';
const SHOWN_ROWS = 50; // export rows drawn; all are counted

const settings = (() => {
  const fragment = new URLSearchParams(location.hash.slice(1));
  for (const name of ['proxy', 'key']) {
    if (fragment.get(name)) sessionStorage.setItem(`dashcache-${name}`, fragment.get(name));
  }
  if (location.hash) history.replaceState(null, '', location.pathname + location.search);
  return {
    get proxy() { return (sessionStorage.getItem('dashcache-proxy') || '').replace(/\/$/, ''); },
    get key() { return sessionStorage.getItem('dashcache-key') || ''; },
  };
})();

// GET a path of the proxy with the key; a JSON error body becomes an Error.
async function api(path, init = {}) {
  const response = await fetch(`${settings.proxy}${path}`, {
    ...init,
    headers: { 'X-API-Key': settings.key, ...(init.headers || {}) },
  });
  if (!response.ok) {
    let detail = `${response.status}`;
    try {
      const body = await response.json();
      detail += `: ${typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail)}`;
    } catch { /* not JSON */ }
    if (response.status === 429) detail += ` (retry in ${response.headers.get('Retry-After')} s)`;
    throw new Error(detail);
  }
  return response;
}

function showCache(id, response) {
  const status = response.headers.get('X-Cache') || '–';
  $(id).textContent = status;
  $(id).className = `x-cache ${status}`;
}

function fail(err) {
  $('error').hidden = false;
  $('error').textContent = `${err.message}`;
}

const money = (x) => Number(x).toLocaleString('en', { minimumFractionDigits: 2, maximumFractionDigits: 2 });

// Bars of revenue per bucket, as inline SVG; each bar carries its numbers.
function drawRevenue(rows) {
  const W = 800, H = 240, L = 56, B = 22, T = 8;
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  const add = (name, attrs, text) => {
    const e = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  const max = Math.max(1, ...rows.map((r) => r.revenue));
  add('line', { class: 'axis', x1: L, y1: H - B, x2: W, y2: H - B });
  add('text', { x: 2, y: T + 10 }, money(max));
  add('text', { x: 2, y: H - B }, '0');
  const step = (W - L) / Math.max(1, rows.length);
  rows.forEach((r, i) => {
    const h = (r.revenue / max) * (H - B - T);
    const bar = add('rect', {
      x: L + i * step + step * 0.1, y: H - B - h, width: Math.max(0.5, step * 0.8), height: h,
      'data-t': r.t, 'data-revenue': r.revenue, 'data-events': r.events,
    });
    const title = document.createElementNS(ns, 'title');
    title.textContent = `${r.t}: ${money(r.revenue)} (${r.events} events)`;
    bar.appendChild(title);
  });
  if (rows.length) {
    add('text', { x: L, y: H - 6 }, rows[0].t);
    add('text', { x: W - 120, y: H - 6 }, rows[rows.length - 1].t);
  }
  $('revenue-chart').replaceChildren(svg);
}

async function loadRevenue() {
  const params = new URLSearchParams(RANGE);
  params.set('granularity', $('granularity').value);
  if ($('country').value) params.set('country', $('country').value);
  const response = await api(`/v1/query/revenue?${params}`);
  showCache('revenue-cache', response);
  $('revenue-range').textContent = response.headers.get('X-Time-Range') || '';
  const { data } = await response.json();
  drawRevenue(data);
  const total = data.reduce((sum, r) => sum + r.revenue, 0);
  $('revenue-total').textContent = `total ${money(total)} over ${data.length} ${$('granularity').value}s`;
  document.body.dataset.revenueLoads = String(Number(document.body.dataset.revenueLoads || 0) + 1);
}

async function loadTop() {
  const response = await api(`/v1/query/top_countries?${RANGE}&limit=10`);
  showCache('top-cache', response);
  const { data } = await response.json();
  const body = $('top-table').querySelector('tbody');
  body.replaceChildren();
  for (const r of data) {
    const tr = body.insertRow();
    tr.dataset.country = r.country;
    for (const [text, cls] of [[r.country, ''], [money(r.revenue), 'num'], [r.events, 'num'], [r.users, 'num']]) {
      const td = tr.insertCell();
      td.textContent = String(text);
      td.className = cls;
    }
  }
  // The country filter offers the countries the table shows.
  const select = $('country');
  if (select.options.length === 1) {
    for (const r of data) select.add(new Option(r.country, r.country));
  }
  document.body.dataset.topLoads = String(Number(document.body.dataset.topLoads || 0) + 1);
}

// The export: rows drawn as the NDJSON stream arrives (fetch +
// ReadableStream); Cancel aborts the fetch, the proxy sees the client go and
// kills the ClickHouse query.
let exporting = null;
window.exportStats = null;

async function startExport() {
  if (exporting) return;
  exporting = new AbortController();
  const stats = { state: 'streaming', rows: 0, bytes: 0, bytesAtFirstRows: null, msToFirstRows: null, msTotal: null };
  window.exportStats = stats;
  const started = performance.now();
  const body = $('export-table').querySelector('tbody');
  body.replaceChildren();
  $('export-status').textContent = 'streaming';
  $('export-cancel').disabled = false;
  $('export-start').disabled = true;
  const days = $('export-days').value;
  try {
    const response = await api(`/v1/export/events?from=today-${days}d&to=today&format=ndjson`, { signal: exporting.signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let rest = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      stats.bytes += value.length;
      const lines = (rest + value).split('\n');
      rest = lines.pop();
      for (const line of lines) {
        if (!line) continue;
        // user_id is a UInt64: as a JSON number it would lose digits past
        // 2^53 in JavaScript, so it is read as text.
        const row = JSON.parse(line.replace(/"user_id":(\d+)/, '"user_id":"$1"'));
        if (row.error) throw new Error(`export failed: ${row.error}`);
        stats.rows += 1;
        if (body.rows.length < SHOWN_ROWS) {
          const tr = body.insertRow();
          for (const [text, cls] of [[row.ts, ''], [row.user_id, ''], [row.country, ''], [row.plan, ''], [row.event, ''], [row.revenue, 'num']]) {
            const td = tr.insertCell();
            td.textContent = String(text);
            td.className = cls;
          }
        }
      }
      if (stats.bytesAtFirstRows === null && stats.rows > 0) {
        stats.bytesAtFirstRows = stats.bytes;
        stats.msToFirstRows = performance.now() - started;
      }
      $('export-count').textContent = `${stats.rows.toLocaleString('en')} rows, ${(stats.bytes / 1e6).toFixed(1)} MB`;
    }
    stats.state = 'done';
  } catch (err) {
    stats.state = err.name === 'AbortError' ? 'cancelled' : 'failed';
    if (stats.state === 'failed') fail(err);
  } finally {
    stats.msTotal = performance.now() - started;
    $('export-status').textContent = stats.state;
    $('export-cancel').disabled = true;
    $('export-start').disabled = false;
    exporting = null;
  }
}

async function loadAll() {
  $('error').hidden = true;
  try {
    await Promise.all([loadTop(), loadRevenue()]);
  } catch (err) {
    fail(err);
  }
}

$('proxy').value = settings.proxy;
$('key').value = settings.key;
$('settings').addEventListener('submit', (e) => {
  e.preventDefault();
  sessionStorage.setItem('dashcache-proxy', $('proxy').value.trim());
  sessionStorage.setItem('dashcache-key', $('key').value.trim());
  loadAll();
});
$('granularity').addEventListener('change', () => loadRevenue().catch(fail));
$('country').addEventListener('change', () => loadRevenue().catch(fail));
$('export-start').addEventListener('click', startExport);
$('export-cancel').addEventListener('click', () => exporting && exporting.abort());
if (settings.proxy && settings.key) loadAll();
