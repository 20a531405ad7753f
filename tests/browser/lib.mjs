// Shared by the browser scenarios: Debian's chromium driven headless through
// playwright-core (never a downloaded browser), a tiny static server that
// plays a web page's own origin (over HTTPS when given a certificate), and
// the one JSON line a scenario reports to tests/it/browser.rs, which makes
// the assertions.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { createServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { extname, join, normalize } from 'node:path';

export const env = (name) => {
  const value = process.env[name];
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
};

// Serves `pages` (path -> HTML text) and, if given, the files under `dir`, on
// 127.0.0.1:port: a page's own origin, another than the proxy's. With `tls`
// ({ cert, key }: PEM file paths) over HTTPS.
export function serve(port, { pages = {}, dir = null, tls = null } = {}) {
  const handler = (req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (pages[path] !== undefined) {
      res.writeHead(200, { 'content-type': TYPES['.html'] });
      res.end(pages[path]);
      return;
    }
    if (dir) {
      const file = normalize(join(dir, path === '/' ? 'index.html' : path));
      if (file.startsWith(normalize(dir)) && statSync(file, { throwIfNoEntry: false })?.isFile()) {
        res.writeHead(200, { 'content-type': TYPES[extname(file)] || 'application/octet-stream' });
        res.end(readFileSync(file));
        return;
      }
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found');
  };
  const server = tls
    ? createHttpsServer({ cert: readFileSync(tls.cert), key: readFileSync(tls.key) }, handler)
    : createServer(handler);
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

// An NSS certificate database under `home` (where Chromium on Linux reads the
// user's trust settings: $HOME/.pki/nssdb) trusting the CA in the PEM file
// `ca` for TLS servers: a real trust anchor, as an operator's workstation
// would have, not an ignored certificate error. certutil comes from Debian's
// libnss3-tools (scripts/browser-setup).
function trustingHome(home, ca) {
  const db = join(home, '.pki', 'nssdb');
  mkdirSync(db, { recursive: true });
  try {
    execFileSync('certutil', ['-N', '--empty-password', '-d', `sql:${db}`]);
  } catch (err) {
    if (err.code === 'ENOENT') throw new Error('certutil is missing: run scripts/browser-setup (installs libnss3-tools)');
    throw err;
  }
  execFileSync('certutil', ['-A', '-n', 'dashcache test CA', '-t', 'C,,', '-i', ca, '-d', `sql:${db}`]);
}

// Chromium with the flags that work here, a fresh profile, and a record of
// console errors and of requests for other hosts (which cannot leave the
// machine: every host name but localhost, 127.0.0.1 and the `hosts` given,
// which resolve to 127.0.0.1, resolves to nothing). With `trust` (a CA's PEM
// file) Chromium trusts that CA, and only the public roots otherwise.
export async function launch({ hosts = [], trust = null } = {}) {
  const profile = mkdtempSync(join(tmpdir(), 'dashcache-chromium-'));
  const env = { ...process.env, HOME: join(profile, 'home') };
  mkdirSync(env.HOME);
  if (trust) trustingHome(env.HOME, trust);
  const mapped = hosts.map((host) => `MAP ${host} 127.0.0.1, `).join('');
  const context = await chromium.launchPersistentContext(join(profile, 'profile'), {
    executablePath: process.env.DASHCACHE_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    env,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      `--host-resolver-rules=${mapped}MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1`,
    ],
    viewport: { width: 1280, height: 900 },
  });
  const seen = { consoleErrors: [], offMachine: [], pageErrors: [] };
  context.on('console', (msg) => {
    if (msg.type() === 'error') seen.consoleErrors.push(msg.text());
  });
  context.on('weberror', (err) => seen.pageErrors.push(String(err.error())));
  // Observed, not intercepted: with request interception Playwright answers
  // CORS preflights itself, and the test would see no real ones.
  context.on('request', (request) => {
    const url = new URL(request.url());
    const local = ['127.0.0.1', 'localhost', '[::1]', ...hosts].includes(url.hostname)
      || ['data:', 'blob:', 'about:'].includes(url.protocol);
    if (!local) seen.offMachine.push(url.href);
  });
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, seen, close };
}

// The proxy's metric `series` (exact, labels included), read from node, not the page.
export async function metric(proxy, series, key) {
  const headers = key ? { 'x-api-key': key } : {};
  const text = await (await fetch(`${proxy}/metrics`, { headers })).text();
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    if (line.slice(0, at) === series) return Number(line.slice(at + 1));
  }
  return 0;
}

// Prints the scenario's findings as the last line of stdout.
export function report(findings) {
  process.stdout.write(`${JSON.stringify(findings)}\n`);
}

// How many distinct colours a PNG has (sampled on a grid), decoded by
// Chromium itself: a blank or single-colour screenshot has one or two.
export async function distinctColours(context, png) {
  const page = await context.newPage();
  try {
    return await page.evaluate(async (b64) => {
      const img = new Image();
      img.src = `data:image/png;base64,${b64}`;
      await img.decode();
      const canvas = document.createElement('canvas');
      canvas.width = img.width;
      canvas.height = img.height;
      const ctx = canvas.getContext('2d');
      ctx.drawImage(img, 0, 0);
      const data = ctx.getImageData(0, 0, img.width, img.height).data;
      const colours = new Set();
      for (let y = 0; y < img.height; y += 4) {
        for (let x = 0; x < img.width; x += 4) {
          const i = (y * img.width + x) * 4;
          colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        }
      }
      return colours.size;
    }, png.toString('base64'));
  } finally {
    await page.close();
  }
}
