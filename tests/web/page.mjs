// Drives the operator's page in Chromium against a live daemon (started by tests/web.rs).
// Env: BASE_URL, KEY (20 credits), BROKE_KEY (0 credits), WEB_MODULES (dir with node_modules),
// CHROMIUM, OUT_DIR (screenshots and downloads), PHOTO (a small photo), BATCH_PHOTOS (three
// large photos, ':'-separated, slow enough for the batch to be polled several times), BIG_PHOTOS
// (four photos of about 5 MB, more than one batch submission may hold).
// Prints one line per check; exits 1 if any failed.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const env = (k) => {
  const v = process.env[k];
  if (!v) { console.error(`page.mjs: ${k} is not set`); process.exit(2); }
  return v;
};
const BASE = env('BASE_URL').replace(/\/$/, '');
const KEY = env('KEY');
const BROKE_KEY = env('BROKE_KEY');
const OUT = env('OUT_DIR');
const PHOTO = env('PHOTO');
const BATCH_PHOTOS = env('BATCH_PHOTOS').split(':');
const BIG_PHOTOS = env('BIG_PHOTOS').split(':');
const require = createRequire(path.join(env('WEB_MODULES'), 'package.json'));
const { chromium } = require('playwright-core');

fs.mkdirSync(OUT, { recursive: true });
const failures = [];
const ok = (cond, what) => { if (!cond) throw new Error(what); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function check(name, fn) {
  const t = Date.now();
  try {
    await fn();
    console.log(`PASS ${name} (${Date.now() - t} ms)`);
  } catch (e) {
    failures.push(name);
    console.log(`FAIL ${name}: ${e && e.stack || e}`);
  }
}

async function apiMessage(key, photo) {
  const fd = new FormData();
  fd.append('image_file', new Blob([fs.readFileSync(photo)]), path.basename(photo));
  const r = await fetch(BASE + '/v1/removebg/process', { method: 'POST', body: fd, headers: { Authorization: 'Bearer ' + key } });
  const v = await r.json();
  return { status: r.status, message: v.error && v.error.message };
}

// ---- browser --------------------------------------------------------------------------------------
const userData = fs.mkdtempSync(path.join(os.tmpdir(), 'removebgd-web-'));
const context = await chromium.launchPersistentContext(userData, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  acceptDownloads: true,
  viewport: { width: 1024, height: 600 },
  timeout: 60000,
});
context.setDefaultTimeout(60000);
// CSP violations become console errors, which every page's listener records.
await context.addInitScript(() => {
  document.addEventListener('securitypolicyviolation', (e) => {
    console.error('CSP violation: ' + e.violatedDirective + ' blocked ' + e.blockedURI);
  });
});

const pages = [];
async function newPage(label, allowedHttpErrors = []) {
  const page = await context.newPage();
  const rec = { label, page, errors: [], requests: [], responses: [] };
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    const t = m.text();
    // Chromium logs every non-2xx fetch; the error checks expect exactly these statuses.
    const expected = allowedHttpErrors.some((s) => t.includes(`status of ${s}`));
    if (!expected) rec.errors.push(t);
  });
  page.on('pageerror', (e) => rec.errors.push('uncaught: ' + e.message));
  page.on('request', (r) => rec.requests.push({ t: Date.now(), method: r.method(), url: r.url(), headers: r.headers() }));
  page.on('response', (r) => rec.responses.push({ status: r.status(), url: r.url() }));
  pages.push(rec);
  return rec;
}

async function upload(page, files) {
  await page.setInputFiles('#files', files);
  await page.click('#process');
}

// 1. Headers: a strict CSP on the page and its assets; CORS off on the API.
await check('1 headers: strict CSP, no CORS', async () => {
  for (const p of ['/', '/ui/app.js', '/ui/app.css']) {
    const r = await fetch(BASE + p);
    ok(r.status === 200, `${p}: status ${r.status}`);
    const csp = r.headers.get('content-security-policy') || '';
    ok(csp.includes("default-src 'none'") && csp.includes("script-src 'self'"), `${p}: CSP is ${JSON.stringify(csp)}`);
    ok(!/unsafe-inline|unsafe-eval|\*/.test(csp), `${p}: CSP not strict: ${csp}`);
    ok(csp.includes("frame-ancestors 'none'"), `${p}: no frame-ancestors`);
    ok(r.headers.get('x-content-type-options') === 'nosniff', `${p}: no nosniff`);
  }
  const js = await fetch(BASE + '/ui/app.js');
  ok(/javascript/.test(js.headers.get('content-type')), 'app.js content type ' + js.headers.get('content-type'));
  const origin = 'http://evil.example';
  const pre = await fetch(BASE + '/v1/removebg/process', {
    method: 'OPTIONS',
    headers: { Origin: origin, 'Access-Control-Request-Method': 'POST', 'Access-Control-Request-Headers': 'authorization' },
  });
  ok(!pre.headers.has('access-control-allow-origin'), 'preflight answered with ' + pre.headers.get('access-control-allow-origin'));
  const q = await fetch(BASE + '/v1/removebg/quota', { headers: { Origin: origin, Authorization: 'Bearer ' + KEY } });
  ok(q.status === 200, 'quota status ' + q.status);
  ok(!q.headers.has('access-control-allow-origin'), 'quota answered with ACAO ' + q.headers.get('access-control-allow-origin'));
});

// 2-3. The kiosk bookmark, one photo, its download; then a red background.
const main = await newPage('main');
await check('2 key from #key=: stored in sessionStorage, fragment removed, no cookie', async () => {
  const { page } = main;
  await page.goto(BASE + '/#key=' + encodeURIComponent(KEY));
  await page.waitForFunction(() => !location.hash);
  ok(!page.url().includes('#'), 'URL still has a fragment: ' + page.url());
  ok(!page.url().includes(KEY), 'URL still has the key');
  const stored = await page.evaluate(() => sessionStorage.getItem('removebgd.key'));
  ok(stored === KEY, 'sessionStorage has ' + stored);
  ok((await page.evaluate(() => document.cookie)) === '', 'document.cookie is not empty');
  ok((await context.cookies()).length === 0, 'the context has cookies');
  // The status line and the gauge, from /readyz and the quota.
  const ready = await (await fetch(BASE + '/readyz')).json();
  await page.waitForFunction((m) => document.getElementById('status').textContent.includes(m), ready.model);
  const status = await page.textContent('#status');
  ok(status.includes(ready.precision) && status.includes('queue') && status.includes('MQTT'), 'status line: ' + status);
  await page.waitForFunction(() => document.getElementById('credits-text').textContent.includes('20 of 20'));
});

await check('3 upload one photo: cutout shown, PNG downloaded; red background gives an opaque download; a cropped one shown alone', async () => {
  const { page } = main;
  await upload(page, PHOTO);
  const card = page.locator('#results .result').first();
  await card.locator('img.cutout').waitFor({ state: 'visible' });
  ok((await card.getAttribute('data-status')) === 'completed', 'first result not completed');
  const natural = await card.locator('img.cutout').evaluate((i) => i.complete && i.naturalWidth);
  ok(natural > 0, 'cutout image did not load');
  // The before/after slider moves the clip.
  await card.locator('input.slider').fill('20');
  const pos = await card.locator('.compare').evaluate((e) => e.style.getPropertyValue('--pos'));
  ok(pos === '20%', 'slider position ' + pos);
  let [dl] = await Promise.all([page.waitForEvent('download'), card.locator('a.download').click()]);
  ok(/\.png$/.test(dl.suggestedFilename()), 'download name ' + dl.suggestedFilename());
  await dl.saveAs(path.join(OUT, 'cutout.png'));
  // The gauge follows the job.
  await page.waitForFunction(() => document.getElementById('credits-text').textContent.includes('19 of 20'));
  ok((await page.evaluate(() => document.getElementById('credits').value)) === 19, 'meter value');

  await page.check('input[name=bg][value=color]');
  await page.fill('#bg-color', '#ff0000');
  await page.click('#process');
  await page.waitForFunction(() => document.querySelectorAll('#results .result[data-status=completed]').length === 2);
  const red = page.locator('#results .result').first();
  [dl] = await Promise.all([page.waitForEvent('download'), red.locator('a.download').click()]);
  await dl.saveAs(path.join(OUT, 'red.png'));
  const sig = fs.readFileSync(path.join(OUT, 'red.png')).subarray(0, 8).toString('hex');
  ok(sig === '89504e470d0a1a0a', 'red download is not a PNG');
  await page.check('input[name=bg][value=none]');

  // Cropped to the subject: the cutout is smaller than the photo, so it is shown alone (no
  // original laid over it, no slider).
  await page.check('#crop');
  await page.click('#process');
  await page.waitForFunction(() => document.querySelectorAll('#results .result[data-status=completed]').length === 3);
  const cropped = page.locator('#results .result').first();
  const [c, o] = await cropped.evaluate((r) => [r.querySelector('img.cutout'), r.querySelector('img.original')]
    .map((i) => [i.naturalWidth, i.naturalHeight]));
  ok(c[0] > 0 && c[0] * c[1] < o[0] * o[1], `cropped cutout ${c.join('x')}, photo ${o.join('x')}`);
  ok(!(await cropped.locator('img.original').isVisible()), 'the original covers a cropped cutout');
  ok(!(await cropped.locator('input.slider').isVisible()), 'a slider for a cropped cutout');
  ok(await main.page.locator('#results .result').nth(1).locator('input.slider').isVisible(), 'the uncropped result lost its slider');
  await page.uncheck('#crop');
});

// 4. The API's own messages: a wrong key (401), an account with no credits (402).
await check('4 errors: the 401 and 402 messages, verbatim', async () => {
  const rec = await newPage('errors', [401, 402]);
  const { page } = rec;
  await page.goto(BASE + '/');
  const wrong = 'rbg_' + 'x'.repeat(40);
  const want401 = await apiMessage(wrong, PHOTO);
  ok(want401.status === 401 && want401.message, 'direct call: ' + JSON.stringify(want401));
  await page.fill('#key-input', wrong);
  await page.click('#key-save');
  await upload(page, PHOTO);
  await page.locator('#results .result[data-status=failed]').waitFor();
  await page.locator('#error').waitFor({ state: 'visible' });
  const shown401 = (await page.textContent('#error')).trim();
  ok(shown401 === want401.message, `page shows ${JSON.stringify(shown401)}, API says ${JSON.stringify(want401.message)}`);
  ok((await page.textContent('#results .result .item-error')).trim() === want401.message, 'item error differs');

  const want402 = await apiMessage(BROKE_KEY, PHOTO);
  ok(want402.status === 402 && want402.message, 'direct call: ' + JSON.stringify(want402));
  await page.click('#key-forget');
  ok((await page.evaluate(() => sessionStorage.getItem('removebgd.key'))) === null, 'forget left the key');
  await page.fill('#key-input', BROKE_KEY);
  await page.click('#key-save');
  await page.waitForFunction(() => document.getElementById('credits-text').textContent.includes('0 of 0'));
  await page.click('#process');
  await page.waitForFunction(() => document.querySelectorAll('#results .result[data-status=failed]').length === 2);
  const shown402 = (await page.textContent('#error')).trim();
  ok(shown402 === want402.message, `page shows ${JSON.stringify(shown402)}, API says ${JSON.stringify(want402.message)}`);
  await page.close();
});

// 5. A 3-photo batch: live progress to completion, polls at least 2 s apart, a ZIP of all.
const batch = await newPage('batch');
await check('5 batch of 3: progress to completion, polls >= 1.9 s apart, ZIP of all results', async () => {
  const { page } = batch;
  await page.goto(BASE + '/#key=' + encodeURIComponent(KEY));
  await page.waitForFunction(() => document.getElementById('credits-text').textContent.includes('of 20'));
  ok(await page.isChecked('#batch'), 'batch box not checked');
  ok(BATCH_PHOTOS.length === 3, 'BATCH_PHOTOS: ' + BATCH_PHOTOS);
  await upload(page, BATCH_PHOTOS);
  const seen = [];
  const deadline = Date.now() + 180000;
  for (;;) {
    const s = await page.evaluate(() => {
      const v = document.getElementById('batch-view'), p = document.getElementById('batch-progress');
      return { hidden: v.hidden, status: v.dataset.status, value: p.value, max: p.max, text: document.getElementById('batch-text').textContent,
        items: Array.from(document.querySelectorAll('#results .result')).map((r) => r.dataset.status).join(',') };
    });
    const line = `${s.status} ${s.value}/${s.max} [${s.items}] ${s.text}`;
    if (seen[seen.length - 1] !== line) seen.push(line);
    if (s.status === 'completed' || s.status === 'failed') break;
    ok(Date.now() < deadline, 'batch did not finish: ' + seen.join(' | '));
    await sleep(100);
  }
  console.log('   batch view: ' + seen.join(' | '));
  ok(seen.some((l) => /^processing 0\/3 /.test(l) || /^processing [12]\/3 /.test(l)), 'no progress shown while processing');
  ok(seen[seen.length - 1].startsWith('completed 3/3'), 'final: ' + seen[seen.length - 1]);
  ok((await page.locator('#results .result[data-status=completed] a.download').count()) === 3, 'not 3 download links');
  // Items in the order sent: the page prepends cards, so compare as sets of names.
  const names = await page.locator('#results .result').evaluateAll((rs) => rs.map((r) => r.dataset.name).sort());
  ok(names.length === 3 && new Set(names).size === 3, 'result names ' + names);

  const polls = batch.requests.filter((r) => r.method === 'GET' && /\/v1\/removebg\/batch\/[^/]+$/.test(new URL(r.url).pathname));
  ok(polls.length >= 2, `${polls.length} poll(s): the batch was too quick to check the polls' spacing`);
  const gaps = polls.slice(1).map((p, i) => p.t - polls[i].t);
  console.log(`   ${polls.length} polls, gaps ${gaps.join(', ')} ms`);
  ok(gaps.every((g) => g >= 1900), 'polls closer than 1.9 s: ' + gaps);
  ok(!batch.responses.some((r) => r.status === 429), 'a poll was answered 429');

  const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#download-all')]);
  ok(dl.suggestedFilename().endsWith('.zip'), 'zip name ' + dl.suggestedFilename());
  const zipPath = path.join(OUT, 'all.zip');
  await dl.saveAs(zipPath);
  const z = fs.readFileSync(zipPath);
  const eocd = z.length - 22;
  ok(z.readUInt32LE(eocd) === 0x06054b50, 'no end of central directory');
  ok(z.readUInt16LE(eocd + 10) === 3, 'zip entries: ' + z.readUInt16LE(eocd + 10));
});

// 6. Layout: kiosk and phone screenshots, no horizontal overflow, dark mode, keyboard.
await check('6 layout: 1024x600 and 390x844 screenshots, no overflow, dark mode, keyboard order', async () => {
  const { page } = batch;
  await page.setViewportSize({ width: 1024, height: 600 });
  ok(await page.evaluate(() => document.documentElement.scrollWidth <= innerWidth), 'horizontal overflow at 1024');
  await page.screenshot({ path: path.join(OUT, 'kiosk-1024x600.png'), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  const w = await page.evaluate(() => [document.documentElement.scrollWidth, innerWidth]);
  ok(w[0] <= w[1], `horizontal overflow at 390: scrollWidth ${w[0]} > ${w[1]}`);
  await page.screenshot({ path: path.join(OUT, 'phone-390x844.png') });

  await page.emulateMedia({ colorScheme: 'light' });
  const light = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  await page.emulateMedia({ colorScheme: 'dark' });
  const dark = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  ok(light !== dark, `background ${light} in both schemes`);
  await page.screenshot({ path: path.join(OUT, 'phone-390x844-dark.png') });
  await page.emulateMedia({ colorScheme: 'light' });

  const k = await newPage('keyboard');
  await k.page.goto(BASE + '/');
  const order = [];
  for (let i = 0; i < 30; i++) {
    await k.page.keyboard.press('Tab');
    order.push(await k.page.evaluate(() => {
      const a = document.activeElement;
      return a.id || (a.name ? a.name + '=' + a.value : a.tagName.toLowerCase());
    }));
  }
  const at = (id) => order.indexOf(id);
  console.log('   tab order: ' + order.join(' '));
  for (const id of ['key-input', 'key-save', 'files', 'camera', 'format', 'size', 'crop', 'batch', 'process']) ok(at(id) >= 0, id + ' not reachable by Tab');
  ok(at('key-input') < at('files') && at('files') < at('camera') && at('camera') < at('format') && at('format') < at('process'), 'tab order: ' + order);
  await k.page.focus('#process');
  await k.page.keyboard.press('Shift+Tab');
  await k.page.keyboard.press('Tab');
  const outline = await k.page.evaluate(() => getComputedStyle(document.activeElement).outlineStyle);
  ok(outline !== 'none', 'no visible focus on #process');
  await k.page.close();
});

// 6b. A selection larger than one batch submission may be (15 MB) goes as several batches.
const split = await newPage('split');
await check('6b a 4-photo selection of 20 MB goes as two batches, all done', async () => {
  const { page } = split;
  ok(BIG_PHOTOS.length === 4, 'BIG_PHOTOS: ' + BIG_PHOTOS);
  const total = BIG_PHOTOS.reduce((n, f) => n + fs.statSync(f).size, 0);
  ok(total > 15 * 1024 * 1024, `the photos are only ${total} bytes: too small to need two batches`);
  await page.goto(BASE + '/#key=' + encodeURIComponent(KEY));
  await page.waitForFunction(() => document.getElementById('credits-text').textContent.includes('of 20'));
  await upload(page, BIG_PHOTOS);
  await page.waitForFunction(() => document.querySelectorAll('#results .result[data-status=completed]').length === 4
    && !document.getElementById('process').disabled, null, { timeout: 180000 });
  const posts = split.requests.filter((r) => r.method === 'POST' && new URL(r.url).pathname === '/v1/removebg/batch');
  ok(posts.length === 2, `${posts.length} batch submissions`);
  ok(!split.responses.some((r) => r.status === 413), 'a submission was too large');
  console.log(`   ${total} bytes in ${posts.length} batches`);
  await page.close();
});

// 7. Nothing went wrong in any page: no console errors, no CSP violations, nothing off-origin.
await check('7 no console errors, no CSP violations, no off-origin requests', async () => {
  const bad = [];
  for (const p of pages) {
    for (const e of p.errors) bad.push(`${p.label}: ${e}`);
    for (const r of p.requests) {
      if (!/^(blob|data):/.test(r.url) && new URL(r.url).origin !== BASE) bad.push(`${p.label}: request to ${r.url}`);
      if (r.url.includes(KEY)) bad.push(`${p.label}: key in a URL`);
    }
  }
  ok(bad.length === 0, bad.join('\n'));
});

await context.close();
fs.rmSync(userData, { recursive: true, force: true });
if (failures.length) {
  console.log(`page.mjs: ${failures.length} check(s) failed: ${failures.join('; ')}`);
  process.exit(1);
}
console.log('page.mjs: all checks passed');
