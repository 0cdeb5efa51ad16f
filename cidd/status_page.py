"""The live status page at ``/`` of cidd's HTTP port: static HTML, a stylesheet and a small script.

The script polls ``/status`` (every 2 s) and ``/stats?worst=10`` (every 30 s) and redraws in place: a grid of
nodes coloured by state with their image, the captures in progress, the latest failures and the statistics. No
build chain: the three texts below are served as they are (``/``, ``/ui/status.css``, ``/ui/status.js``). Every
value from cidd goes into the page as text (``textContent``), never as markup, and the page's Content-Security-
Policy allows nothing but its own script, stylesheet and requests to cidd.
"""

from __future__ import annotations

HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cidd status</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/ui/status.css">
<script src="/ui/status.js" defer></script>
</head>
<body data-updates="0" data-stats-updates="0">
<header>
  <h1>cidd</h1>
  <div id="counts" class="counts"></div>
  <div id="live" class="live">connecting&hellip;</div>
</header>
<main>
  <section id="grid-section">
    <h2>Nodes <small id="node-total"></small></h2>
    <div id="legend" class="legend"></div>
    <div id="grid" class="grid"></div>
  </section>
  <section id="captures-section">
    <h2>Captures in progress</h2>
    <table id="captures"><thead><tr><th>job</th><th>image</th><th>user</th><th class="num">nodes</th>
      <th class="num">ready</th><th class="num">failed</th><th class="num">pending</th><th>progress</th><th>steps</th>
      <th>deadline</th></tr></thead><tbody></tbody>
    </table>
    <p id="no-captures" class="empty">No capture is running.</p>
  </section>
  <section id="failures-section">
    <h2>Recent failures</h2>
    <table id="failures"><thead><tr><th>when</th><th>node</th><th>job</th><th>image</th><th>kind</th>
      <th>reason</th></tr></thead><tbody></tbody></table>
    <p id="no-failures" class="empty">No failure in the kept history.</p>
  </section>
  <section id="stats-section">
    <h2>Statistics <small id="stats-range"></small></h2>
    <div id="stats-total" class="total"></div>
    <h3>Nodes that fail most</h3>
    <table id="worst"><thead><tr><th>node</th><th class="num">switches</th><th class="num">success</th>
      <th class="num">failed</th><th>failures by kind</th><th>rungs</th><th>last failure</th></tr></thead>
      <tbody></tbody></table>
    <p id="no-worst" class="empty">No node failed.</p>
    <h3>Time per phase, by image <small>(median / 95th percentile)</small></h3>
    <table id="images" class="phases"><thead></thead><tbody></tbody></table>
    <h3>Time per phase, by group</h3>
    <table id="groups" class="phases"><thead></thead><tbody></tbody></table>
  </section>
</main>
<footer>Read-only view of cidd: <a href="/status">/status</a> (JSON), <a href="/stats">/stats</a> (JSON),
  <a href="/metrics">/metrics</a> (Prometheus). docs/operations.md explains them.</footer>
</body>
</html>
"""

CSS = """:root { --ready: #2e9d4f; --offline: #9aa0a6; --in_installer: #7fb3d5; --to_installer: #e8a317;
  --installing: #2f6fd6; --to_image: #8e44ad; --failed: #d93025; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #202124; background: #f8f9fa; }
header { display: flex; align-items: center; gap: 16px; padding: 8px 16px; background: #202124; color: #fff; }
header h1 { font-size: 18px; margin: 0; }
.counts { display: flex; gap: 6px; flex-wrap: wrap; flex: 1; }
.chip { padding: 2px 8px; border-radius: 10px; color: #fff; font-size: 12px; }
.live { font-size: 12px; opacity: 0.8; }
.live.down { color: #ffb4ab; opacity: 1; font-weight: bold; }
main { padding: 8px 16px; }
section { background: #fff; border: 1px solid #dadce0; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
h2 { font-size: 16px; margin: 4px 0 8px; } h3 { font-size: 14px; margin: 12px 0 4px; }
small { color: #5f6368; font-weight: normal; }
.legend { display: flex; gap: 12px; font-size: 12px; margin-bottom: 6px; flex-wrap: wrap; }
.legend span::before { content: ""; display: inline-block; width: 10px; height: 10px; margin-right: 4px;
  border-radius: 2px; background: var(--c); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(104px, 1fr)); gap: 4px; }
.node { position: relative; border-radius: 4px; padding: 3px 5px 6px; color: #fff; overflow: hidden;
  font-size: 11px; min-height: 38px; }
.node b { display: block; font-size: 12px; }
.node span { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; opacity: 0.9; }
.node i { position: absolute; left: 0; bottom: 0; height: 3px; background: #fff; opacity: 0.85; width: 0; }
.node.offline-agent { opacity: 0.75; }
.s-ready { background: var(--ready); } .s-offline { background: var(--offline); }
.s-in_installer { background: var(--in_installer); } .s-to_installer { background: var(--to_installer); }
.s-installing { background: var(--installing); } .s-to_image { background: var(--to_image); }
.s-failed { background: var(--failed); }
table { border-collapse: collapse; width: 100%; font-size: 12px; }
th, td { text-align: left; padding: 3px 6px; border-bottom: 1px solid #eee; vertical-align: top; }
th { color: #5f6368; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { width: 120px; height: 8px; background: #e8eaed; border-radius: 4px; overflow: hidden; }
.bar i { display: block; height: 100%; background: var(--ready); width: 0; }
.empty { color: #5f6368; font-style: italic; margin: 4px 0; }
.total { font-size: 13px; }
footer { padding: 8px 16px 16px; font-size: 12px; color: #5f6368; }
"""

JS = r"""'use strict';
(function () {
  const STATES = ['ready', 'offline', 'in_installer', 'to_installer', 'installing', 'to_image', 'failed'];
  const PHASES = ['to_installer', 'installing', 'to_image'];
  const params = new URLSearchParams(location.search);
  const STATUS_MS = 1000 * (parseFloat(params.get('interval')) || 2);
  const STATS_MS = 1000 * (parseFloat(params.get('stats_interval')) || 30);
  const cells = new Map();
  let serverTime = Date.now() / 1000;

  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function dur(s) {
    if (s === null || s === undefined) return '-';
    if (s < 90) return s.toFixed(s < 10 ? 1 : 0) + 's';
    if (s < 5400) return Math.floor(s / 60) + 'm' + String(Math.round(s % 60)).padStart(2, '0') + 's';
    if (s < 172800) return Math.floor(s / 3600) + 'h' + String(Math.floor(s % 3600 / 60)).padStart(2, '0') + 'm';
    return Math.floor(s / 86400) + 'd';
  }
  function ago(ts) { return ts ? dur(Math.max(0, serverTime - ts)) + ' ago' : '-'; }
  function bytes(n) {
    if (!n) return '-';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(n < 10 && i ? 1 : 0) + ' ' + units[i];
  }
  function pct(x) { return x === null || x === undefined ? '-' : (100 * x).toFixed(1) + '%'; }
  function row(tbody, values, numeric) {
    const tr = el('tr');
    values.forEach((v, i) => {
      const td = (v instanceof Node) ? (() => { const c = el('td'); c.appendChild(v); return c; })() : el('td', v);
      if (numeric && numeric.includes(i)) td.classList.add('num');
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
    return tr;
  }
  function bar(fraction) {
    const b = el('div', null, 'bar'), i = el('i');
    i.style.width = Math.round(100 * Math.min(1, Math.max(0, fraction))) + '%';
    b.appendChild(i);
    return b;
  }
  function replaceBody(table) {
    const old = table.tBodies[0], fresh = el('tbody');
    table.replaceChild(fresh, old);
    return fresh;
  }

  function drawLegend() {
    const legend = $('legend');
    STATES.forEach(s => { const span = el('span', s); span.style.setProperty('--c', 'var(--' + s + ')');
      legend.appendChild(span); });
  }

  function drawNodes(nodes) {
    const grid = $('grid'), seen = new Set(), counts = {};
    nodes.forEach(n => {
      seen.add(n.node);
      counts[n.state] = (counts[n.state] || 0) + 1;
      let c = cells.get(n.node);
      if (!c) {
        c = { box: el('div', null, 'node'), name: el('b', n.node), image: el('span'), bar: el('i') };
        c.box.dataset.node = n.node;
        c.box.append(c.name, c.image, c.bar);
        grid.appendChild(c.box);
        cells.set(n.node, c);
      }
      const switching = n.state === 'to_installer' || n.state === 'installing' || n.state === 'to_image';
      const text = switching && n.target ? (n.image || '?') + ' \u2192 ' + n.target : (n.image || '-');
      c.box.className = 'node s-' + n.state + (n.online ? '' : ' offline-agent');
      c.box.dataset.state = n.state;
      c.box.dataset.image = n.image || '';
      c.image.textContent = text;
      const p = n.progress;
      c.bar.style.width = (n.state === 'installing' && p && p.total) ?
        Math.round(100 * p.done / p.total) + '%' : '0';
      const lines = [n.node + ': ' + n.state, 'image: ' + (n.image || '-')];
      if (n.target) lines.push('target: ' + n.target);
      if (n.job) lines.push('job: ' + n.job);
      if (n.rung) lines.push('ladder rung: ' + n.rung);
      if (p && p.total) {
        lines.push('install: ' + bytes(p.done) + ' of ' + bytes(p.total) + (p.step ? ' (' + p.step + ')' : ''));
      }
      if (n.reason) lines.push('reason: ' + n.reason);
      lines.push('agent: ' + (n.online ? (n.mode || 'online') + ', seen ' + ago(n.last_seen) : 'offline'));
      c.box.title = lines.join('\n');
    });
    for (const [name, c] of cells) { if (!seen.has(name)) { c.box.remove(); cells.delete(name); } }
    $('node-total').textContent = '(' + nodes.length + ')';
    const chips = $('counts');
    chips.textContent = '';
    STATES.forEach(s => {
      if (!counts[s]) return;
      const chip = el('span', s + ' ' + counts[s], 'chip');
      chip.style.background = 'var(--' + s + ')';
      chip.dataset.state = s;
      chips.appendChild(chip);
    });
  }

  function drawCaptures(captures, byName) {
    const body = replaceBody($('captures'));
    const running = captures.filter(c => c.state === 'running');
    $('no-captures').hidden = running.length > 0;
    running.forEach(cap => {
      const names = Object.keys(cap.nodes);
      let ready = 0, failed = 0, done = 0, total = 0;
      const steps = {};
      names.forEach(name => {
        const s = cap.nodes[name].state, live = byName.get(name);
        if (s === 'ready') ready++; else if (s === 'failed') failed++; else steps[s] = (steps[s] || 0) + 1;
        if (live && live.state === 'installing' && live.progress && live.progress.total) {
          done += live.progress.done; total += live.progress.total;
        }
      });
      const pending = names.length - ready - failed;
      const fraction = names.length ? (ready + failed) / names.length : 1;
      const label = Object.entries(steps).map(([k, v]) => v + ' ' + k).join(', ') +
        (total ? ' \u00b7 writing ' + Math.round(100 * done / total) + '%' : '');
      const tr = row(body, [cap.job, cap.image, cap.user || '-', names.length, ready, failed, pending,
        bar(fraction), label || '-', cap.deadline ? 'in ' + dur(Math.max(0, cap.deadline - serverTime)) : '-'],
        [3, 4, 5, 6]);
      tr.dataset.job = cap.job;
    });
  }

  function drawFailures(failures) {
    const body = replaceBody($('failures'));
    $('no-failures').hidden = failures.length > 0;
    failures.forEach(f => { row(body, [ago(f.ts), f.node, f.job || '-', f.image || '-', f.kind || '-',
      f.reason || '-']).dataset.node = f.node; });
  }

  async function pollStatus() {
    try {
      const response = await fetch('/status', { cache: 'no-store' });
      if (!response.ok) throw new Error('HTTP ' + response.status);
      const data = await response.json();
      serverTime = data.time || Date.now() / 1000;
      const byName = new Map(data.nodes.map(n => [n.node, n]));
      drawNodes(data.nodes);
      drawCaptures(data.captures || [], byName);
      drawFailures(data.failures || []);
      const live = $('live');
      live.textContent = 'live \u00b7 updated ' + new Date().toLocaleTimeString();
      live.classList.remove('down');
      document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
    } catch (err) {
      const live = $('live');
      live.textContent = 'cidd unreachable (' + err.message + '); retrying';
      live.classList.add('down');
    }
    setTimeout(pollStatus, STATUS_MS);
  }

  function phaseHead(table, first) {
    const head = table.tHead;
    head.textContent = '';
    const tr = el('tr');
    const heads = [first, 'switches', 'success'].concat(PHASES, ['installed', 'install rate']);
    heads.forEach((h, i) => tr.appendChild(el('th', h, i ? 'num' : '')));
    head.appendChild(tr);
  }
  function phaseCell(p) { return p && p.count ? dur(p.median) + ' / ' + dur(p.p95) : '-'; }
  function drawPhases(table, key, rows) {
    phaseHead(table, key);
    const body = replaceBody(table);
    rows.forEach(r => row(body, [r[key], r.switches, pct(r.success_rate)].concat(
      PHASES.map(p => phaseCell(r.phases[p])), [bytes(r.bytes),
        r.install_rate ? bytes(r.install_rate) + '/s' : '-']), [1, 2, 3, 4, 5, 6, 7]).dataset[key] = r[key]);
  }
  function kinds(failures) { return Object.entries(failures).map(([k, v]) => k + ' ' + v).join(', ') || '-'; }

  async function pollStats() {
    try {
      const response = await fetch('/stats?worst=10', { cache: 'no-store' });
      if (!response.ok) throw new Error('HTTP ' + response.status);
      const s = await response.json();
      const t = s.total;
      $('stats-total').textContent = t.switches + ' switches, ' + pct(t.success_rate) + ' succeeded, ' +
        t.failed + ' failed, ' + t.fallback_saves + ' saved by a fallback rung, ' + bytes(t.bytes) + ' installed';
      $('stats-range').textContent = s.events_since ? '(events kept since ' +
        new Date(s.events_since * 1000).toLocaleString() + '; older history in ' + s.rollup_days +
        '-day roll-ups)' : '';
      const body = replaceBody($('worst'));
      $('no-worst').hidden = s.nodes.length > 0;
      s.nodes.forEach(n => {
        const rungs = Object.entries(n.rungs).map(([k, v]) => '#' + k + ': ' + v).join(', ') || '-';
        const last = n.last_failure ? ago(n.last_failure.ts) + ': ' + n.last_failure.reason : '-';
        row(body, [n.node, n.switches, pct(n.success_rate), n.failed, kinds(n.failures), rungs, last],
          [1, 2, 3]).dataset.node = n.node;
      });
      drawPhases($('images'), 'image', s.images);
      drawPhases($('groups'), 'group', s.groups);
      document.body.dataset.statsUpdates = String(Number(document.body.dataset.statsUpdates) + 1);
    } catch (err) {
      $('stats-total').textContent = 'statistics unavailable (' + err.message + ')';
    }
    setTimeout(pollStats, STATS_MS);
  }

  drawLegend();
  pollStatus();
  pollStats();
})();
"""

#: Headers of every page resource: no framing, no sniffing, nothing but cidd's own script, style and JSON.
HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                b"img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-cache",
}
