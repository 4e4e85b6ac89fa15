/* SAE feature browser: no dependencies, works from file://.
 * Data: SAE_DATA.meta, SAE_DATA.index, SAE_DATA.vocab (data/*.js) and the per-latent chunks
 * (data/chunks/NNNNNN.js, loaded on demand with a <script> tag that calls SAE_DATA.chunk). */
(function () {
  "use strict";
  var D = window.SAE_DATA || {};
  var meta = D.meta || {}, idx = D.index || {freq: []}, vocab = D.vocab || {};
  var M = idx.freq.length, PAGE = 100, CHUNK = meta.chunk_size || 64;
  var state = {key: "id", asc: true, page: 0, order: [], shown: [], selected: null};
  var chunks = {}, waiting = {};
  var $ = function (id) { return document.getElementById(id); };

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function tokRaw(t) { if (t === null || t === undefined || t < 0) return ""; var s = vocab[t]; return s === undefined ? "#" + t : s; }
  function tokShow(t) {
    var s = tokRaw(t).replace(/\r/g, "").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
    return s === "" ? "\u2205" : s;
  }
  function num(x, d) {
    if (x === null || x === undefined) return "\u2013";
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1000 || a < 0.001) return x.toExponential(2);
    return Number(x.toPrecision(d || 3)).toString();
  }
  function pct(f) { return f === null || f === undefined ? "\u2013" : (f === 0 ? "0%" : num(f * 100, 3) + "%"); }
  function pad6(n) { var s = String(n); while (s.length < 6) s = "0" + s; return s; }

  /* ------------------------------------------------------------------ chunks */
  D.chunk = function (n, records) {
    chunks[n] = records;
    (waiting[n] || []).forEach(function (cb) { cb(records); });
    delete waiting[n];
  };
  function loadChunk(n, cb) {
    if (chunks[n]) { cb(chunks[n]); return; }
    if (waiting[n]) { waiting[n].push(cb); return; }
    waiting[n] = [cb];
    var s = document.createElement("script");
    s.src = "data/chunks/" + pad6(n) + ".js";
    s.onerror = function () { $("detail").innerHTML = '<p class="empty">Could not load ' + esc(s.src) + "</p>"; };
    document.head.appendChild(s);
  }

  /* ------------------------------------------------------------------ header */
  function header() {
    document.title = "SAE features \u2013 " + (meta.run_name || "");
    $("title").textContent = "SAE feature browser \u2013 " + (meta.run_name || "");
    var bits = [
      "<b>" + esc(meta.arch) + "</b>" + (meta.k ? " k=" + meta.k : "") + ", " + M.toLocaleString() + " latents, d_in " + meta.d_in,
      "site <b>" + esc(meta.site) + "</b> of <b>" + esc(meta.model || "?") + "</b>",
      "encoding: " + esc(meta.encoding),
      "<b>" + (meta.rows || 0).toLocaleString() + "</b> rows of shard" + ((meta.shards || []).length > 1 ? "s " : " ") + esc(meta.shards_text || ""),
      meta.drop_bos ? "position-0 rows skipped (as in training)" : "all positions"
    ];
    $("meta").innerHTML = bits.join(" \u00b7 ") + '<br>checkpoint <span class="chip">' + esc(meta.checkpoint || "") + "</span>";
    $("notes").innerHTML = (meta.notes || []).map(function (n) { return "<li>" + esc(n) + "</li>"; }).join("");
    if (!idx.promotes) Array.prototype.forEach.call(document.querySelectorAll(".promotes"), function (e) { e.style.display = "none"; });
  }

  /* ------------------------------------------------------------------ index */
  function value(i, key) {
    if (key === "id") return i;
    if (key === "top") return idx.top[i] < 0 ? "\uffff" : tokRaw(idx.top[i]).trim().toLowerCase();
    if (key === "promotes") return idx.promotes ? tokRaw(idx.promotes[i][0]).trim().toLowerCase() : "";
    var v = idx[key][i];
    return v === null ? -Infinity : v;
  }
  function sortOrder() {
    var key = state.key, dir = state.asc ? 1 : -1;
    var ids = new Array(M);
    for (var i = 0; i < M; i++) ids[i] = i;
    var vals = ids.map(function (i) { return value(i, key); });
    ids.sort(function (a, b) { var x = vals[a], y = vals[b]; return x < y ? -dir : x > y ? dir : a - b; });
    state.order = ids;
  }
  function tokenMatches(q) {
    var hit = {};
    Object.keys(vocab).forEach(function (id) {
      if (vocab[id].toLowerCase().indexOf(q) >= 0) hit[id] = true;
    });
    return hit;
  }
  function filter() {
    var q = $("search").value.trim().toLowerCase();
    var fmin = parseFloat($("fmin").value), fmax = parseFloat($("fmax").value), amin = parseFloat($("amin").value);
    var dead = $("dead").checked, hit = q ? tokenMatches(q) : null, asId = /^#?\d+$/.test(q) ? parseInt(q.replace("#", ""), 10) : -1;
    state.shown = state.order.filter(function (i) {
      var f = idx.freq[i] || 0;
      if (!dead && !idx.count[i]) return false;
      if (!isNaN(fmin) && f * 100 < fmin) return false;
      if (!isNaN(fmax) && f * 100 > fmax) return false;
      if (!isNaN(amin) && (idx.max[i] || 0) < amin) return false;
      if (hit) {
        if (i === asId) return true;
        var toks = idx.toks[i].concat(idx.promotes ? idx.promotes[i] : []);
        for (var j = 0; j < toks.length; j++) if (hit[toks[j]]) return true;
        return false;
      }
      return true;
    });
    state.page = 0;
    table();
  }
  function table() {
    var pages = Math.max(1, Math.ceil(state.shown.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    var rows = state.shown.slice(state.page * PAGE, (state.page + 1) * PAGE);
    $("table").tBodies[0].innerHTML = rows.map(function (i) {
      var promotes = idx.promotes ? idx.promotes[i].map(function (t) { return '<span class="chip">' + esc(tokShow(t)) + "</span>"; }).join(" ") : "";
      return '<tr data-id="' + i + '"' + (i === state.selected ? ' class="selected"' : "") + ">" +
        '<td class="num">' + i + "</td>" +
        '<td class="num">' + pct(idx.freq[i]) + "</td>" +
        '<td class="num">' + num(idx.max[i]) + "</td>" +
        '<td class="num">' + num(idx.mean[i]) + "</td>" +
        '<td class="tokcell">' + (idx.top[i] >= 0 ? '<span class="chip">' + esc(tokShow(idx.top[i])) + "</span>" : '<span class="empty">never fired</span>') + "</td>" +
        (idx.promotes ? '<td class="tokcell promotes">' + promotes + "</td>" : "") + "</tr>";
    }).join("");
    $("count").textContent = state.shown.length.toLocaleString() + " of " + M.toLocaleString() + " latents" +
      ($("dead").checked ? "" : " (dead hidden)");
    $("page").textContent = "page " + (state.page + 1) + " of " + pages;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
    Array.prototype.forEach.call(document.querySelectorAll("th"), function (th) {
      th.classList.toggle("sorted", th.dataset.key === state.key);
      th.classList.toggle("asc", th.dataset.key === state.key && state.asc);
    });
  }

  /* ------------------------------------------------------------------ one latent */
  /* shades: activation / the latent's max, in thousandths; -1 = not encoded */
  function shade(a) {
    if (!(a > 0)) return "";
    return "background: rgba(249, 115, 22, " + (0.12 + 0.78 * Math.min(1, a / 1000)).toFixed(3) + ");";
  }
  function example(ex, max, cls) {
    var row = ex[0], pos = ex[1], val = ex[2], center = ex[3], toks = ex[4], acts = ex[5];
    var rps = meta.rows_per_shard || 1;
    var where = "shard " + Math.floor(row / rps) + ", row " + (row % rps) + ", position " + pos;
    var html = toks.map(function (t, i) {
      var a = acts[i], c = "tok" + (i === center ? " max" : "") + (a < 0 ? " off" : "");
      var act = i === center ? num(val, 4) : (a > 0 ? "\u2248" + num(a * max / 1000, 3) : "0");
      var title = "token " + t + " " + JSON.stringify(tokRaw(t)) + " \u00b7 activation " + (a < 0 ? "not encoded" : act);
      return '<span class="' + c + '" style="' + shade(a) + '" title="' + esc(title) + '">' + esc(tokShow(t)) + "</span>";
    }).join("");
    var ctx = meta.has_tokenizer ? "ctx" : "ctx ids";  /* ids: spaced apart, there is no text to join */
    return '<div class="ex ' + cls + '" title="' + esc(where) + '"><span class="val">' + num(val, 4) + '</span><span class="' + ctx + '">' + html + "</span></div>";
  }
  function histogram(h) {
    if (!h) return '<p class="empty">never fired</p>';
    var c = h.counts, n = c.length, W = 400, H = 130, B = 16, top = Math.max.apply(null, c), bw = W / n;
    var bars = c.map(function (v, i) {
      var y = v ? Math.max(1, (H - B - 4) * v / top) : 0;
      return '<rect x="' + (i * bw + 0.5).toFixed(2) + '" y="' + (H - B - y).toFixed(2) + '" width="' + Math.max(bw - 1, 0.5).toFixed(2) +
        '" height="' + y.toFixed(2) + '"><title>[' + num(i * h.width, 4) + ", " + num((i + 1) * h.width, 4) + "): " + v + "</title></rect>";
    }).join("");
    var axis = '<text x="0" y="' + (H - 3) + '">0</text><text x="' + W / 2 + '" y="' + (H - 3) + '" text-anchor="middle">' + num(n * h.width / 2) +
      '</text><text x="' + W + '" y="' + (H - 3) + '" text-anchor="end">' + num(n * h.width) + '</text><text x="2" y="10">' + top + "</text>";
    return '<svg viewBox="0 0 ' + W + " " + H + '" preserveAspectRatio="none">' + bars + axis + "</svg>";
  }
  function logitTable(list, cls) {
    var big = Math.max.apply(null, list.map(function (p) { return Math.abs(p[1] || 0); })) || 1;
    return '<table class="' + cls + '">' + list.map(function (p) {
      return '<tr><td><span class="chip">' + esc(tokShow(p[0])) + '</span></td><td style="width:40%"><div class="bar" style="width:' +
        (100 * Math.abs(p[1] || 0) / big).toFixed(1) + '%"></div></td><td class="v">' + num(p[1], 3) + "</td></tr>";
    }).join("") + "</table>";
  }
  function render(rec) {
    var max = rec.max || 0;
    var html = "<h2>Latent " + rec.id + "</h2>";
    html += '<div class="stats">fires on <b>' + pct(rec.freq) + "</b> of rows (" + rec.count.toLocaleString() + " of " +
      (meta.rows || 0).toLocaleString() + ") \u00b7 max activation <b>" + num(rec.max, 4) + "</b> \u00b7 mean when firing <b>" + num(rec.mean, 4) + "</b></div>";
    html += '<div class="grid2"><div class="card hist"><h3>Activation histogram</h3>' + histogram(rec.hist) +
      (rec.hist ? '<div class="axis">activation (x) \u00b7 rows that fire with it (y)</div>' : "") + "</div>";
    html += '<div class="card"><h3>Logit effect</h3>' + (rec.pos ? '<div class="logits"><div><small>promotes</small>' + logitTable(rec.pos, "pos") +
      "</div><div><small>suppresses</small>" + logitTable(rec.neg, "neg") + "</div></div>" : '<p class="empty">' + esc(meta.logits_note || "not computed") + "</p>") + "</div></div>";
    html += '<div class="card near"><h3>Nearest latents (decoder cosine)</h3>' + (rec.near || []).map(function (p) {
      return '<a href="#' + p[0] + '">latent ' + p[0] + "</a><small>" + num(p[1], 3) + "</small> ";
    }).join("") + "</div>";
    html += '<div class="card" id="top"><h3>Top activations</h3>' + (rec.top.length ? rec.top.map(function (e) { return example(e, max, "top"); }).join("") :
      '<p class="empty">never fired on the inspected rows</p>') + "</div>";
    if (rec.bands.length) {
      html += '<div class="card" id="bands"><h3>Examples across activation ranges (uniform samples per band)</h3>' + rec.bands.slice().reverse().map(function (b) {
        return '<div class="band">activation <b>[' + num(b.lo, 4) + ", " + num(b.hi, 4) + ")</b> \u00b7 " + b.n.toLocaleString() + " firings (" +
          pct(b.n / rec.count) + ")</div>" + b.ex.map(function (e) { return example(e, max, "sample"); }).join("");
      }).join("") + "</div>";
    }
    $("detail").innerHTML = html;
  }
  function open(id) {
    if (!(id >= 0 && id < M)) return;
    state.selected = id;
    Array.prototype.forEach.call(document.querySelectorAll("tbody tr"), function (tr) {
      tr.classList.toggle("selected", Number(tr.dataset.id) === id);
    });
    var n = Math.floor(id / CHUNK);
    loadChunk(n, function (records) { if (state.selected === id) render(records[id - n * CHUNK]); });
  }
  function fromHash() { var m = /^#(\d+)$/.exec(location.hash); if (m) open(parseInt(m[1], 10)); }

  /* ------------------------------------------------------------------ wiring */
  function debounce(fn, ms) { var t; return function () { clearTimeout(t); t = setTimeout(fn, ms); }; }
  header();
  sortOrder();
  filter();
  ["search", "fmin", "fmax", "amin"].forEach(function (id) { $(id).addEventListener("input", debounce(filter, 150)); });
  $("dead").addEventListener("change", filter);
  $("prev").addEventListener("click", function () { state.page--; table(); });
  $("next").addEventListener("click", function () { state.page++; table(); });
  document.querySelector("thead").addEventListener("click", function (e) {
    var key = e.target.dataset && e.target.dataset.key;
    if (!key) return;
    if (state.key === key) state.asc = !state.asc; else { state.key = key; state.asc = key === "id" || key === "top"; }
    sortOrder();
    filter();
  });
  $("table").tBodies[0].addEventListener("click", function (e) {
    var tr = e.target.closest("tr");
    if (tr) location.hash = "#" + tr.dataset.id;
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
