// `tether demo` in a real browser: headless Debian chromium, driven by playwright-core.
//
// Run by tests/browser_demo.rs, which starts the demo and sets:
//   TETHER_DEMO_URL   the proxy, e.g. http://127.0.0.1:8080 (required)
//   TETHER_ADMIN_URL  its admin listener, e.g. http://127.0.0.1:9901 (required)
//   TETHER_ARTIFACTS  where screenshots go (default: ./artifacts)
//   CHROMIUM          the browser binary (default: /usr/bin/chromium)
// Every page gets its own browser context: two people, not two tabs of one.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { chromium } from 'playwright-core';

const BASE = process.env.TETHER_DEMO_URL;
const ADMIN = process.env.TETHER_ADMIN_URL;
const ARTIFACTS = process.env.TETHER_ARTIFACTS || 'artifacts';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const DELIVERY_MS = 1000; // the budget for an edit to show up in another page
const TRANSPORTS = ['ws', 'sse', 'poll'];

let browser;
const contexts = [];

before(async () => {
  assert.ok(BASE, 'set TETHER_DEMO_URL to the demo proxy, e.g. http://127.0.0.1:8080');
  assert.ok(ADMIN, 'set TETHER_ADMIN_URL to the demo admin listener, e.g. http://127.0.0.1:9901');
  mkdirSync(ARTIFACTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
});

const uniqueDoc = (label) => `${label}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;

/** A new person opening `path`; resolves once the editor is live. Page errors fail the test. */
async function openEditor(path) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  contexts.push(context);
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (error) => page.errors.push(error.message));
  await page.goto(BASE + path);
  await page.waitForFunction(() => document.body.dataset.state === 'live', null, { timeout: 10_000 });
  return page;
}

async function closeAll() {
  while (contexts.length) await contexts.pop().close();
}

const editorText = (page) => page.locator('#editor').inputValue();
const liveServer = (page) => page.locator('#live-server').textContent();
const pageServer = (page) => page.locator('#page-server').textContent();

function waitForText(page, wanted, timeout = DELIVERY_MS) {
  return page.waitForFunction((t) => document.getElementById('editor').value.includes(t), wanted, {
    timeout,
    polling: 5,
  });
}

function waitForViewers(page, count) {
  return page.waitForFunction((n) => document.body.dataset.viewers === String(n), count, {
    timeout: 5_000,
    polling: 20,
  });
}

/** Types `text` at the end of `from`'s editor; returns ms until `to` shows it. */
async function typeAndTime(from, to, text) {
  await from.locator('#editor').focus();
  await from.keyboard.press('Control+End');
  await from.keyboard.type(text);
  const typed = performance.now();
  await waitForText(to, text);
  return Math.round(performance.now() - typed);
}

for (const transport of TRANSPORTS) {
  test(`over ${transport}, text typed in one page appears in the other within 1 s, both on one app server`, async (t) => {
    const doc = uniqueDoc(`e2e-${transport}`);
    const a = await openEditor(`/docs/${doc}?transport=${transport}`);
    const b = await openEditor(`/docs/${doc}?transport=${transport}`);
    await Promise.all([waitForViewers(a, 2), waitForViewers(b, 2)]);

    const aToB = await typeAndTime(a, b, `Hello from A over ${transport}.`);
    const bToA = await typeAndTime(b, a, ' And hello from B.');
    assert.equal(await editorText(a), await editorText(b));

    const [serverA, serverB] = [await liveServer(a), await liveServer(b)];
    assert.match(serverA, /^app-\d+$/);
    assert.equal(serverA, serverB, 'both pages must be served by the one server holding the document');
    assert.equal(await pageServer(a), serverA);
    assert.equal(await pageServer(b), serverA);
    assert.deepEqual([...a.errors, ...b.errors], []);
    t.diagnostic(`${transport}: A->B ${aToB} ms, B->A ${bToA} ms, both on ${serverA}`);
    await a.screenshot({ path: join(ARTIFACTS, `editor-${transport}.png`) });
    await closeAll();
  });

  test(`over ${transport}, two people typing at once lose no text`, async () => {
    const doc = uniqueDoc(`concurrent-${transport}`);
    const a = await openEditor(`/docs/${doc}?transport=${transport}`);
    const b = await openEditor(`/docs/${doc}?transport=${transport}`);
    await typeAndTime(a, b, '--');
    await a.locator('#editor').focus();
    await a.keyboard.press('Control+Home');
    await b.locator('#editor').focus();
    await b.keyboard.press('Control+End');
    // A types at the start while B types at the end; with a 10 ms pause per key the two
    // streams of edits overlap, so each side keeps having edits in flight.
    await Promise.all([
      a.keyboard.type('left side ', { delay: 10 }),
      b.keyboard.type(' right side', { delay: 10 }),
    ]);
    const expected = 'left side -- right side';
    await Promise.all([waitForText(a, expected, 3_000), waitForText(b, expected, 3_000)]);
    assert.equal(await editorText(a), expected);
    assert.equal(await editorText(b), expected);
    assert.deepEqual([...a.errors, ...b.errors], []);
    await closeAll();
  });
}

test('on /unpinned/, two pages on different app servers do not see each other', async (t) => {
  const doc = uniqueDoc('unpinned');
  const opened = [];
  let pair;
  // Round robin sends each new page (and its WebSocket) to the next server; a few pages are
  // enough for two to hold their live connection on different servers.
  for (let i = 0; i < 6 && !pair; i++) {
    const page = await openEditor(`/unpinned/docs/${doc}?transport=ws`);
    const server = await liveServer(page);
    const other = opened.find((o) => o.server !== server);
    opened.push({ page, server });
    if (other) pair = [other, { page, server }];
  }
  assert.ok(pair, `every page landed on ${opened[0].server}: no split to show`);
  const [a, b] = pair;
  assert.notEqual(a.server, b.server);

  const marker = `typed on ${a.server} only`;
  await a.page.locator('#editor').focus();
  await a.page.keyboard.type(marker);
  await sleep(DELIVERY_MS);
  // The demonstrated failure: without sticky routing the document is split between servers.
  assert.ok((await editorText(a.page)).includes(marker));
  assert.ok(!(await editorText(b.page)).includes(marker), 'an edit crossed servers on the unpinned route');
  t.diagnostic(`unpinned: page A on ${a.server}, page B on ${b.server}; B never saw A's edit`);
  await a.page.screenshot({ path: join(ARTIFACTS, 'unpinned-a.png') });
  await b.page.screenshot({ path: join(ARTIFACTS, 'unpinned-b.png') });
  await closeAll();
});

for (const transport of TRANSPORTS) {
  test(`over ${transport}, draining the document's server moves both pages to one other server, text and all`, async (t) => {
    const doc = uniqueDoc(`drain-${transport}`);
    const a = await openEditor(`/docs/${doc}?transport=${transport}`);
    const b = await openEditor(`/docs/${doc}?transport=${transport}`);
    await typeAndTime(a, b, 'This text moves with its readers.');
    const before = await liveServer(a);
    const state = await (await fetch(`${BASE}/docs/${doc}/state`)).json();
    assert.equal(state.server, before);

    const drain = `${ADMIN}/upstreams/app/backends/${state.address}/drain`;
    assert.equal((await fetch(drain, { method: 'POST' })).status, 200);
    try {
      // Tether closes the document's streams; the pages reconnect to the new owner.
      // Settled: live on another server, both there, nothing of ours unconfirmed.
      const moved = (page) =>
        page.waitForFunction(
          (old) =>
            document.body.dataset.liveServer !== old &&
            document.body.dataset.state === 'live' &&
            document.body.dataset.viewers === '2' &&
            window.tetherDemo.outstanding === null,
          before,
          { timeout: 10_000, polling: 20 },
        );
      await Promise.all([moved(a), moved(b)]);
      const after = await liveServer(a);
      assert.equal(await liveServer(b), after);
      const text = 'This text moves with its readers.';
      await Promise.all([waitForText(a, text, 3_000), waitForText(b, text, 3_000)]);
      assert.equal(await editorText(a), text);
      assert.equal(await editorText(b), text);
      await typeAndTime(b, a, ' Still live.');
      assert.deepEqual([...a.errors, ...b.errors], []);
      t.diagnostic(`${transport}: drained ${before}, both pages now on ${after}`);
      await a.screenshot({ path: join(ARTIFACTS, `after-drain-${transport}.png`) });
    } finally {
      // Pages first: undraining moves the document back, to a server with an old copy.
      await closeAll();
      await fetch(drain, { method: 'DELETE' });
    }
  });
}
