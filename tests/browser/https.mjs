// A dashboard page served over https:// on one origin calling the proxy over
// https:// on another (both names resolve to 127.0.0.1; both certificates
// from the test's CA, which this Chromium trusts through its NSS database):
// reads an answer and streams an export chunk by chunk, with CORS. Reports
// what the page read, the page's and every response's TLS state as Chromium
// saw it (CDP: Security and Network), failed loads, console errors; then two
// controls: the same page asking for http:// (blocked as mixed content), and
// a Chromium that does not trust the CA (the page does not load).
// tests/it/browser.rs asserts.
import { env, launch, report, serve } from './lib.mjs';

const proxy = env('DASHCACHE_PROXY');
const key = env('DASHCACHE_KEY');
const ca = env('DASHCACHE_CA');
const pageHost = env('DASHCACHE_PAGE_HOST');
const proxyHost = new URL(proxy).hostname;
const pageUrl = `https://${pageHost}:${env('DASHCACHE_PAGE_PORT')}/`;
const blank = '<!doctype html><meta charset="utf-8"><title>dashboard</title><link rel="icon" href="data:,"><body>panels</body>';
const server = await serve(Number(env('DASHCACHE_PAGE_PORT')), {
  pages: { '/': blank },
  tls: { cert: env('DASHCACHE_PAGE_CERT'), key: env('DASHCACHE_PAGE_KEY') },
});

const findings = {};
try {
  const { context, seen, close } = await launch({ hosts: [pageHost, proxyHost], trust: ca });
  try {
    const tab = await context.newPage();
    const cdp = await context.newCDPSession(tab);
    const responses = [];
    const failed = [];
    const urls = new Map();
    cdp.on('Network.requestWillBeSent', (e) => urls.set(e.requestId, e.request.url));
    cdp.on('Network.responseReceived', (e) => {
      const r = e.response;
      const details = r.securityDetails || {};
      responses.push({
        url: r.url,
        type: e.type,
        status: r.status,
        protocol: r.protocol,
        securityState: r.securityState,
        tls: details.protocol,
        subject: details.subjectName,
        issuer: details.issuer,
        sanList: details.sanList,
      });
    });
    cdp.on('Network.loadingFailed', (e) => failed.push({
      url: urls.get(e.requestId),
      type: e.type,
      canceled: e.canceled,
      error: e.errorText,
      blockedReason: e.blockedReason,
      corsError: e.corsErrorStatus?.corsError,
    }));
    let pageSecurity = null;
    cdp.on('Security.visibleSecurityStateChanged', (e) => {
      const s = e.visibleSecurityState;
      pageSecurity = {
        state: s.securityState,
        issues: s.securityStateIssueIds,
        issuer: s.certificateSecurityState?.issuer,
        subject: s.certificateSecurityState?.subjectName,
        tls: s.certificateSecurityState?.protocol,
      };
    });
    await cdp.send('Network.enable');
    await cdp.send('Security.enable');

    const loaded = await tab.goto(pageUrl);
    findings.pageStatus = loaded.status();
    findings.pageOrigin = await tab.evaluate(() => window.location.origin);
    findings.secureContext = await tab.evaluate(() => window.isSecureContext);

    findings.query = await tab.evaluate(async ([proxy, key]) => {
      const r = await fetch(`${proxy}/v1/query/revenue?from=today-7d&to=today&granularity=day`, {
        headers: { 'X-API-Key': key },
      });
      const body = await r.json();
      return { status: r.status, xCache: r.headers.get('x-cache'), rows: body.data.length };
    }, [proxy, key]);

    // The export, read as it arrives: how many reads, and how much had
    // arrived when the first row was complete.
    findings.export = await tab.evaluate(async ([proxy, key]) => {
      const r = await fetch(`${proxy}/v1/export/events?from=today-7d&to=today&format=ndjson`, {
        headers: { 'X-API-Key': key },
      });
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let chunks = 0;
      let bytes = 0;
      let rows = 0;
      let bytesAtFirstRow = null;
      let firstRow = null;
      let rest = '';
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks += 1;
        bytes += value.length;
        rest += decoder.decode(value, { stream: true });
        const lines = rest.split('\n');
        rest = lines.pop();
        for (const line of lines) {
          if (line === '') continue;
          if (firstRow === null) {
            firstRow = JSON.parse(line);
            bytesAtFirstRow = bytes;
          }
          rows += 1;
        }
      }
      return {
        status: r.status,
        contentType: r.headers.get('content-type'),
        chunks,
        bytes,
        rows,
        bytesAtFirstRow,
        firstRowKeys: firstRow ? Object.keys(firstRow) : [],
        trailing: rest,
      };
    }, [proxy, key]);
    // Let the last security and network events arrive.
    await tab.evaluate(() => new Promise((resolve) => setTimeout(resolve, 200)));
    findings.pageSecurity = pageSecurity;
    findings.responses = responses;
    findings.failed = [...failed];
    findings.consoleErrors = [...seen.consoleErrors];
    findings.pageErrors = [...seen.pageErrors];
    findings.offMachine = [...seen.offMachine];

    // Control: the same page asking the proxy's name over http:// is
    // blocked by Chromium before anything is sent (mixed content).
    const errorsBefore = seen.consoleErrors.length;
    const failedBefore = failed.length;
    findings.mixed = await tab.evaluate(async (url) => {
      try {
        const r = await fetch(url);
        return { status: r.status };
      } catch (err) {
        return { error: String(err) };
      }
    }, `http://${proxyHost}:${new URL(proxy).port}/healthz`);
    await tab.evaluate(() => new Promise((resolve) => setTimeout(resolve, 200)));
    findings.mixed.failed = failed.slice(failedBefore);
    findings.mixed.consoleErrors = seen.consoleErrors.slice(errorsBefore);
  } finally {
    await close();
  }

  // Control: a Chromium without the test CA does not load the page.
  const untrusting = await launch({ hosts: [pageHost, proxyHost] });
  try {
    const tab = await untrusting.context.newPage();
    try {
      await tab.goto(pageUrl);
      findings.untrusted = { loaded: true };
    } catch (err) {
      findings.untrusted = { loaded: false, error: String(err.message).split('\n')[0] };
    }
  } finally {
    await untrusting.close();
  }
} finally {
  server.close();
}
report(findings);
