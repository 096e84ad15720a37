// The operator's page: talks only to this daemon's API, with the key kept in sessionStorage.
'use strict';

(function () {
  const KEY = 'removebgd.key';
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  let files = [];     // File[] chosen, not yet processed
  let results = [];   // {name, blob} for "Download all"
  let busy = false;

  // ---- the key -------------------------------------------------------------------------------
  function takeKeyFromFragment() {
    if (!location.hash) return;
    const params = new URLSearchParams(location.hash.slice(1));
    const k = params.get('key');
    if (k) sessionStorage.setItem(KEY, k);
    // The fragment never reaches a server, and now it leaves the address bar and the history.
    history.replaceState(null, '', location.pathname + location.search);
  }
  const key = () => sessionStorage.getItem(KEY) || '';

  function showKey() {
    const k = key();
    $('key-state').textContent = k ? 'Key set for this tab (…' + k.slice(-4) + ').' : 'No key yet.';
    $('key-forget').hidden = !k;
    $('key-entry').hidden = !!k; // once set, the form folds away (small screens)
  }

  // ---- API -------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message, code) { super(message); this.status = status; this.code = code; }
  }

  async function api(path, init) {
    init = init || {};
    const headers = new Headers(init.headers || {});
    if (key()) headers.set('Authorization', 'Bearer ' + key());
    const res = await fetch(path, Object.assign({}, init, { headers, credentials: 'omit', cache: 'no-store' }));
    let body = null;
    try { body = await res.json(); } catch (_) { body = null; }
    if (!res.ok) {
      const e = body && body.error;
      const err = new ApiError(res.status, (e && e.message) || ('HTTP ' + res.status), e && e.code);
      err.retryAfter = Number(res.headers.get('Retry-After')) || 0;
      throw err;
    }
    return body;
  }

  function showError(message) {
    const p = $('error');
    p.textContent = message;
    p.hidden = !message;
  }

  // ---- status line and credits -----------------------------------------------------------------
  async function refreshStatus() {
    let r;
    try {
      const res = await fetch('/readyz', { cache: 'no-store', credentials: 'omit' });
      r = await res.json();
    } catch (_) {
      $('status').textContent = 'Node unreachable';
      $('status').dataset.ready = 'false';
      return;
    }
    const q = r.queue || {};
    const mqtt = r.mqtt == null ? 'MQTT off' : (r.mqtt.connected ? 'MQTT connected' : 'MQTT disconnected');
    const parts = [r.ready ? 'Ready' : 'Not ready' + (r.reasons && r.reasons.length ? ' (' + r.reasons.join(', ') + ')' : ''),
      'model ' + r.model + ' (' + r.precision + ')',
      'queue ' + (q.waiting || 0) + ' waiting, ' + (q.running || 0) + ' running', mqtt];
    $('status').textContent = parts.join(' · ');
    $('status').dataset.ready = String(!!r.ready);
  }

  async function refreshQuota() {
    if (!key()) { $('credits-text').textContent = '–'; $('credits').value = 0; return; }
    try {
      const q = await api('/v1/removebg/quota');
      const m = $('credits');
      m.max = Math.max(1, q.credits_total);
      m.value = q.credits_remaining;
      $('credits-text').textContent = q.credits_remaining + ' of ' + q.credits_total + ' left';
    } catch (e) {
      $('credits-text').textContent = '–';
      showError(e.message);
    }
  }

  // ---- photos in ---------------------------------------------------------------------------------
  function choose(list) {
    files = Array.from(list).filter((f) => !f.type || f.type.startsWith('image/'));
    const ul = $('selected');
    ul.replaceChildren(...files.map((f) => el('li', '', f.name + ' (' + Math.ceil(f.size / 1024) + ' KB)')));
  }

  function options() {
    const o = { output_format: $('format').value, output_size: $('size').value, crop: $('crop').checked ? 'true' : 'false' };
    const bg = document.querySelector('input[name=bg]:checked').value;
    if (bg === 'color') o.bg_color = $('bg-color').value.replace('#', '');
    if (bg === 'gradient') o.bg_gradient = $('bg-gradient').value.trim();
    if (bg === 'image') o.bg_image_url = $('bg-image-url').value.trim();
    return o;
  }

  function formFor(opts) {
    const fd = new FormData();
    for (const [k, v] of Object.entries(opts)) fd.append(k, v);
    return fd;
  }

  // Unique names: a batch item's id is its file name, and the ZIP needs distinct entries.
  function uniqueNames(list) {
    const seen = new Set();
    return list.map((f) => {
      let n = f.name || 'photo';
      const dot = n.lastIndexOf('.');
      const stem = dot > 0 ? n.slice(0, dot) : n, ext = dot > 0 ? n.slice(dot) : '';
      for (let i = 2; seen.has(n); i++) n = stem + '-' + i + ext;
      seen.add(n);
      return n;
    });
  }

  // ---- results -------------------------------------------------------------------------------------
  // A cropped cutout is not the original's size: it is shown alone, without the slider.
  function resultCard(file, name, cropped) {
    const li = el('li', 'result');
    li.dataset.name = name;
    li.dataset.status = 'queued';
    const title = el('h3', '', name);
    const compare = el('div', 'compare');
    compare.style.setProperty('--pos', '50%');
    if (cropped) compare.classList.add('cropped');
    const cut = el('img', 'cutout');
    cut.alt = 'Cutout of ' + name;
    cut.hidden = true;
    const orig = el('img', 'original');
    orig.alt = '';
    orig.src = URL.createObjectURL(file);
    compare.append(cut, orig);
    const slider = el('input', 'slider');
    slider.type = 'range';
    slider.min = '0'; slider.max = '100'; slider.value = '50';
    slider.setAttribute('aria-label', 'Before / after: ' + name);
    slider.addEventListener('input', () => compare.style.setProperty('--pos', slider.value + '%'));
    const status = el('p', 'item-status', 'Queued');
    const error = el('p', 'item-error');
    error.hidden = true;
    const link = el('a', 'download', 'Download');
    link.hidden = true;
    li.append(title, compare, slider, status, error, link);
    $('results').prepend(li);
    $('empty').hidden = true;
    return {
      li,
      setStatus(s, text) { li.dataset.status = s; status.textContent = text || s; },
      fail(message) {
        li.dataset.status = 'failed';
        status.textContent = 'Failed';
        error.textContent = message;
        error.hidden = false;
        compare.classList.add('failed');
      },
      async show(resultUrl, format) {
        const path = new URL(resultUrl, location.href).pathname;
        const res = await fetch(path, { cache: 'no-store', credentials: 'omit' });
        if (!res.ok) throw new Error('result download failed: HTTP ' + res.status);
        const blob = await res.blob();
        const ext = (path.match(/\.(png|webp|jpe?g)$/i) || [])[1] || format || 'png';
        const dot = name.lastIndexOf('.');
        const file = (dot > 0 ? name.slice(0, dot) : name) + '.' + ext.toLowerCase();
        const url = URL.createObjectURL(blob);
        cut.src = url;
        cut.hidden = false;
        compare.classList.add('done');
        link.href = url;
        link.download = file;
        link.textContent = 'Download ' + file;
        link.hidden = false;
        results.push({ name: file, blob });
        $('download-all').disabled = false;
        li.dataset.status = 'completed';
        status.textContent = 'Done';
      },
    };
  }

  // ---- processing ----------------------------------------------------------------------------------
  async function processOne(file, name, opts) {
    const card = resultCard(file, name, opts.crop === 'true');
    card.setStatus('processing', 'Processing…');
    try {
      const fd = formFor(opts);
      fd.append('image_file', file, name);
      const r = await api('/v1/removebg/process', { method: 'POST', body: fd });
      await card.show(r.result_url, opts.output_format);
    } catch (e) {
      card.fail(e.message);
      throw e;
    }
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  async function processBatch(list, names, opts) {
    // Cards are prepended: made last to first, they read in the order sent.
    const cards = [];
    for (let i = list.length - 1; i >= 0; i--) cards[i] = resultCard(list[i], names[i], opts.crop === 'true');
    const fd = formFor(opts);
    list.forEach((f, i) => fd.append('image_file', f, names[i]));
    const view = $('batch-view'), bar = $('batch-progress'), text = $('batch-text');
    view.hidden = false;
    view.dataset.status = 'submitting';
    bar.max = list.length;
    bar.value = 0;
    text.textContent = 'Uploading ' + list.length + ' photos…';
    let job;
    try {
      job = await api('/v1/removebg/batch', { method: 'POST', body: fd });
    } catch (e) {
      view.dataset.status = 'failed';
      text.textContent = 'Batch refused';
      cards.forEach((c) => c.fail(e.message));
      throw e;
    }
    const shown = new Set();
    let wait = POLL_MS;
    for (;;) {
      view.dataset.status = 'processing';
      await sleep(wait);
      let b;
      try {
        b = await api('/v1/removebg/batch/' + encodeURIComponent(job.job_id));
        wait = POLL_MS;
      } catch (e) {
        if (e.status === 429) { wait = Math.max(POLL_MS, e.retryAfter * 1000); continue; }
        view.dataset.status = 'failed';
        text.textContent = e.message;
        throw e;
      }
      bar.max = b.total;
      bar.value = b.completed + b.failed;
      text.textContent = b.completed + ' of ' + b.total + ' done' + (b.failed ? ', ' + b.failed + ' failed' : '');
      const work = [];
      (b.items || []).forEach((it, i) => {
        const c = cards[i];
        if (!c || shown.has(i)) return;
        if (it.status === 'completed' && it.result_url) {
          shown.add(i);
          c.setStatus('fetching', 'Fetching the result…');
          work.push(c.show(it.result_url, opts.output_format).catch((e) => c.fail(e.message)));
        } else if (it.status === 'failed') {
          shown.add(i);
          c.fail(it.error || it.error_code || 'failed');
        } else {
          c.setStatus(it.status, it.status === 'processing' ? 'Processing…' : 'Queued');
        }
      });
      await Promise.all(work);
      if (b.status !== 'processing') {
        view.dataset.status = b.status;
        text.textContent += ' · batch ' + b.status;
        return;
      }
    }
  }

  // A batch submission holds at most 100 photos and 15 MB in all (the API's limits): a larger
  // selection goes as several batches, one after the other. [from, to) ranges of the list.
  const BATCH_ITEMS = 100, BATCH_BYTES = 14 * 1024 * 1024;
  function batchGroups(list) {
    const groups = [];
    let from = 0, bytes = 0;
    list.forEach((f, i) => {
      if (i > from && (i - from >= BATCH_ITEMS || bytes + f.size > BATCH_BYTES)) {
        groups.push([from, i]);
        from = i;
        bytes = 0;
      }
      bytes += f.size;
    });
    groups.push([from, list.length]);
    return groups;
  }

  async function run(ev) {
    ev.preventDefault();
    if (busy) return;
    if (!key()) { showError('Enter the API key first.'); $('key-input').focus(); return; }
    if (!files.length) { showError('Choose at least one photo.'); $('files').focus(); return; }
    const list = files, names = uniqueNames(list), opts = options();
    busy = true;
    $('process').disabled = true;
    showError('');
    try {
      if (list.length > 1 && $('batch').checked) {
        for (const [from, to] of batchGroups(list)) {
          await processBatch(list.slice(from, to), names.slice(from, to), opts);
        }
      } else {
        let first = null;
        for (let i = 0; i < list.length; i++) {
          try { await processOne(list[i], names[i], opts); } catch (e) { first = first || e; }
        }
        if (first) throw first;
      }
    } catch (e) {
      showError(e.message);
    } finally {
      busy = false;
      $('process').disabled = false;
      refreshQuota();
    }
  }

  // ---- "Download all": a store-only ZIP ------------------------------------------------------------
  const CRC_TABLE = (() => {
    const t = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      t[n] = c >>> 0;
    }
    return t;
  })();
  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  async function zip(entries) {
    const enc = new TextEncoder();
    const parts = [], central = [];
    let offset = 0;
    const now = new Date();
    const time = (now.getHours() << 11) | (now.getMinutes() << 5) | (now.getSeconds() >> 1);
    const date = ((now.getFullYear() - 1980) << 9) | ((now.getMonth() + 1) << 5) | now.getDate();
    const used = new Set();
    for (const e of entries) {
      let name = e.name;
      for (let i = 2; used.has(name); i++) name = i + '-' + e.name;
      used.add(name);
      const nameBytes = enc.encode(name);
      const data = new Uint8Array(await e.blob.arrayBuffer());
      const crc = crc32(data);
      const local = new DataView(new ArrayBuffer(30));
      local.setUint32(0, 0x04034b50, true);
      local.setUint16(4, 20, true);
      local.setUint16(6, 0x0800, true); // UTF-8 names
      local.setUint16(8, 0, true);      // stored
      local.setUint16(10, time, true);
      local.setUint16(12, date, true);
      local.setUint32(14, crc, true);
      local.setUint32(18, data.length, true);
      local.setUint32(22, data.length, true);
      local.setUint16(26, nameBytes.length, true);
      local.setUint16(28, 0, true);
      const cd = new DataView(new ArrayBuffer(46));
      cd.setUint32(0, 0x02014b50, true);
      cd.setUint16(4, 20, true);
      cd.setUint16(6, 20, true);
      cd.setUint16(8, 0x0800, true);
      cd.setUint16(10, 0, true);
      cd.setUint16(12, time, true);
      cd.setUint16(14, date, true);
      cd.setUint32(16, crc, true);
      cd.setUint32(20, data.length, true);
      cd.setUint32(24, data.length, true);
      cd.setUint16(28, nameBytes.length, true);
      cd.setUint32(42, offset, true);
      parts.push(local, nameBytes, data);
      central.push(cd, nameBytes);
      offset += 30 + nameBytes.length + data.length;
    }
    const cdSize = central.reduce((s, p) => s + p.byteLength, 0);
    const end = new DataView(new ArrayBuffer(22));
    end.setUint32(0, 0x06054b50, true);
    end.setUint16(8, entries.length, true);
    end.setUint16(10, entries.length, true);
    end.setUint32(12, cdSize, true);
    end.setUint32(16, offset, true);
    return new Blob([...parts, ...central, end], { type: 'application/zip' });
  }

  async function downloadAll() {
    if (!results.length) return;
    const blob = await zip(results);
    const a = el('a');
    a.href = URL.createObjectURL(blob);
    a.download = 'removebgd-results.zip';
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60000);
  }

  // ---- wiring ----------------------------------------------------------------------------------------
  function init() {
    takeKeyFromFragment();
    showKey();
    $('key-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const k = $('key-input').value.trim();
      if (!k) return;
      sessionStorage.setItem(KEY, k);
      $('key-input').value = '';
      showError('');
      showKey();
      refreshQuota();
    });
    $('key-forget').addEventListener('click', () => {
      sessionStorage.removeItem(KEY);
      showKey();
      refreshQuota();
      $('key-input').focus();
    });
    $('files').addEventListener('change', (ev) => choose(ev.target.files));
    $('camera').addEventListener('change', (ev) => choose(ev.target.files));
    const drop = $('drop');
    drop.addEventListener('dragover', (ev) => { ev.preventDefault(); drop.classList.add('over'); });
    drop.addEventListener('dragleave', () => drop.classList.remove('over'));
    drop.addEventListener('drop', (ev) => {
      ev.preventDefault();
      drop.classList.remove('over');
      if (ev.dataTransfer && ev.dataTransfer.files.length) choose(ev.dataTransfer.files);
    });
    // Touching a background's input picks that background.
    for (const [id, v] of [['bg-color', 'color'], ['bg-gradient', 'gradient'], ['bg-image-url', 'image']]) {
      $(id).addEventListener('input', () => { document.querySelector('input[name=bg][value=' + v + ']').checked = true; });
    }
    $('job-form').addEventListener('submit', run);
    $('download-all').addEventListener('click', () => downloadAll().catch((e) => showError(e.message)));
    refreshStatus();
    setInterval(refreshStatus, 10000);
    refreshQuota();
  }

  init();
})();
