"use strict";
// The audit page's behaviour: sort the table; draw each adapter's heatmap and DDI curve
// from the JSON data block. Data is only ever put into the page as textContent or as
// numbers in SVG attributes, never as markup.
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const CELL = 20, LABEL = 34, TOP = 100, LONG = 18;

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const key of Object.keys(attrs)) node.setAttribute(key, String(attrs[key]));
    if (parent) parent.appendChild(node);
    return node;
  }
  function text(parent, x, y, content, attrs) {
    const node = el("text", Object.assign({ x: x, y: y }, attrs || {}), parent);
    node.textContent = content;
    return node;
  }
  function tip(node, content) { el("title", {}, node).textContent = content; }
  function short(name) { return name.length > LONG ? name.slice(0, LONG - 1) + "\u2026" : name; }
  function fmt(v) { return v === null ? "not finite" : Number(v.toPrecision(6)).toString(); }
  function colour(f) {
    const x = Math.min(1, Math.max(0, f)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const a = VIRIDIS[i], b = VIRIDIS[i + 1], t = x - i;
    return "rgb(" + a.map((c, j) => Math.round(c + (b[j] - c) * t)).join(",") + ")";
  }
  function blockName(b) { return b === null ? "-" : String(b); }
  function largest(modules) {
    return modules.reduce((top, m) => (m[3] !== null && m[3] > top ? m[3] : top), 0);
  }

  // DDI by block (rows, modules outside any block last) and kind (columns), as render.grid
  function heatmap(modules) {
    const blocks = [...new Set(modules.map(m => m[2]))].sort((a, b) =>
      a === null ? 1 : b === null ? -1 : a - b);
    const kinds = [...new Set(modules.map(m => m[1]))];
    const cells = new Map();
    for (const m of modules) {
      const key = blockName(m[2]) + "\u0000" + m[1], old = cells.get(key);
      cells.set(key, old === undefined || (m[3] !== null && (old === null || m[3] > old)) ? m[3] : old);
    }
    const top = largest(modules);
    const svg = el("svg", { class: "heatmap", width: Math.max(LABEL + kinds.length * CELL + 12, 240),
                            height: TOP + blocks.length * CELL + 24, role: "img" });
    tip(svg, "DDI by block and module kind");
    kinds.forEach((kind, j) => {
      const x = LABEL + j * CELL + CELL / 2 + 4;
      tip(text(svg, x, TOP - 6, short(kind), { transform: "rotate(-60 " + x + " " + (TOP - 6) + ")" }), kind);
    });
    blocks.forEach((block, i) => {
      text(svg, LABEL - 4, TOP + i * CELL + CELL - 4, blockName(block), { "text-anchor": "end" });
      kinds.forEach((kind, j) => {
        const key = blockName(block) + "\u0000" + kind, v = cells.get(key);
        const state = v === undefined ? "empty" : v === null ? "nan" : "value";
        const rect = el("rect", { class: "cell " + state, "data-state": state, x: LABEL + j * CELL,
                                  y: TOP + i * CELL, width: CELL - 1, height: CELL - 1 }, svg);
        if (state === "value") rect.setAttribute("fill", colour(top > 0 ? v / top : 0));
        tip(rect, "block " + blockName(block) + ", " + kind + ": " +
            (v === undefined ? "no module" : "DDI " + fmt(v)));
      });
    });
    text(svg, LABEL, TOP + blocks.length * CELL + 16, "colour: DDI, 0 to " + fmt(top) + " (largest)");
    return svg;
  }

  // the finite modules' DDI, highest first, one point per module, as plot.py's right panel
  function curve(modules) {
    const ddi = modules.map(m => m[3]).filter(v => v !== null).sort((a, b) => b - a);
    const W = 480, H = 260, L = 80, R = 12, T = 24, B = 40, top = largest(modules) || 1;
    const svg = el("svg", { class: "curve-plot", width: W, height: H, role: "img" });
    const x = i => ddi.length > 1 ? L + i * (W - L - R) / (ddi.length - 1) : (L + W - R) / 2;
    const y = v => T + (1 - v / top) * (H - T - B);
    text(svg, L, 14, ddi.length + " modules, sorted by DDI");
    el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }, svg);
    el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }, svg);
    text(svg, L - 4, T + 4, fmt(top), { "text-anchor": "end" });
    text(svg, L - 4, H - B, "0", { "text-anchor": "end" });
    text(svg, (L + W) / 2, H - 10, "rank (highest DDI first)", { "text-anchor": "middle" });
    text(svg, 12, (T + H - B) / 2, "DDI", { transform: "rotate(-90 12 " + (T + H - B) / 2 + ")" });
    el("polyline", { class: "curve", points: ddi.map((v, i) => x(i) + "," + y(v)).join(" ") }, svg);
    ddi.forEach((v, i) => tip(el("circle", { class: "point", cx: x(i), cy: y(v), r: 2.5 }, svg),
                              "rank " + (i + 1) + ": DDI " + fmt(v)));
    return svg;
  }

  function draw(details, adapter) {
    if (details.dataset.drawn) return;
    details.dataset.drawn = "1";
    const charts = document.createElement("div");
    charts.className = "charts";
    charts.append(heatmap(adapter.m), curve(adapter.m));
    details.appendChild(charts);
  }

  function sections() {
    const data = JSON.parse(document.getElementById("modules").textContent);
    const list = document.getElementById("details");
    data.forEach((adapter, i) => {
      const details = document.createElement("details"), summary = document.createElement("summary");
      details.id = "a" + Number(adapter.id);
      details.className = "adapter";
      summary.textContent = adapter.path + " \u2014 " + adapter.m.length + " modules, max DDI " +
        fmt(largest(adapter.m));
      details.appendChild(summary);
      details.addEventListener("toggle", () => { if (details.open) draw(details, adapter); });
      list.appendChild(details);
      if (i === 0) { details.open = true; draw(details, adapter); }
    });
  }

  function openTarget() {
    const target = location.hash ? document.getElementById(location.hash.slice(1)) : null;
    if (target && target.tagName === "DETAILS") { target.open = true; target.scrollIntoView(); }
  }

  // numbers compare as numbers, text by code units; empty cells last in either direction
  function sortBy(table, th) {
    const body = table.tBodies[0], col = th.cellIndex, numeric = th.dataset.type === "number";
    const was = th.getAttribute("aria-sort");
    const dir = was === "descending" ? "ascending" : was === "ascending" ? "descending"
      : numeric ? "descending" : "ascending";
    for (const other of table.tHead.rows[0].cells) other.setAttribute("aria-sort", "none");
    th.setAttribute("aria-sort", dir);
    const sign = dir === "ascending" ? 1 : -1;
    const key = row => numeric ? (row.cells[col].dataset.v === "" ? null : Number(row.cells[col].dataset.v))
      : row.cells[col].textContent;
    const rows = Array.from(body.rows, (row, i) => [key(row), i, row]);
    rows.sort((a, b) => {
      if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
      return sign * (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0) || a[1] - b[1];
    });
    for (const row of rows) body.appendChild(row[2]);
  }

  const table = document.getElementById("adapters");
  for (const th of table.tHead.rows[0].cells) th.addEventListener("click", () => sortBy(table, th));
  sections();
  window.addEventListener("hashchange", openTarget);
  openTarget();
})();
