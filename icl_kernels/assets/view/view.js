// The head explorer of `icl-kernels view` (icl_kernels/studies/view.py): reads the run's record from
// the #run-data element and builds the page. Hand-written, no libraries, no network.
"use strict";
(function () {
  const R = JSON.parse(document.getElementById("run-data").textContent);
  const app = document.getElementById("app");
  const CLASS_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
  const ROLE_NAMES = {bos: "BOS", demo_input: "demonstration input x_i", label: "label word y_i",
                      separator: "separator", query: "query", other: "other"};

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "style") node.style.cssText = v;
      else node.setAttribute(k, v);
    }
    for (const c of children || []) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return node;
  }
  const fmt = (x, d = 3) => (x === null || x === undefined || Number.isNaN(x) ? "n/a" : Number(x).toFixed(d));
  const rate = (r) => (r && r.value !== null ? `${fmt(r.value)} [${fmt(r.low)}, ${fmt(r.high)}] (n=${r.n})` : "n/a");

  // Sequential colour on [0, 1]: pale yellow -> dark blue (five stops, linear between them).
  const STOPS = [[255, 255, 217], [199, 233, 180], [65, 182, 196], [34, 94, 168], [8, 29, 88]];
  function seqColour(t) {
    if (t === null || t === undefined || Number.isNaN(t)) return "#eeeeee";
    t = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i;
    const c = STOPS[i].map((a, j) => Math.round(a + f * (STOPS[i + 1][j] - a)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }
  const textOn = (t) => (t !== null && t > 0.55 ? "#ffffff" : "#111111");

  // A layer x head table: layer 0 at the bottom, heads left to right. cell(l, h) -> {value, tip, mark}.
  function headGrid(id, nLayers, nHeads, cell, onHover, onClick) {
    const table = el("table", {id: id, class: "grid"});
    const head = el("tr", {}, [el("th", {text: "layer \\ head"})]);
    for (let h = 0; h < nHeads; h++) head.appendChild(el("th", {text: String(h)}));
    table.appendChild(head);
    for (let l = nLayers - 1; l >= 0; l--) {
      const row = el("tr", {}, [el("th", {text: String(l)})]);
      for (let h = 0; h < nHeads; h++) {
        const c = cell(l, h);
        const td = el("td", {class: "cell" + (c.mark ? " best" : ""), "data-layer": l, "data-head": h,
                             title: c.tip, text: c.value === null ? "" : fmt(c.value, 2),
                             style: `background:${seqColour(c.scaled)};color:${textOn(c.scaled)}`});
        if (onHover) td.addEventListener("mouseenter", () => onHover(l, h));
        if (onClick) td.addEventListener("click", () => onClick(l, h));
        row.appendChild(td);
      }
      table.appendChild(row);
    }
    return table;
  }

  function scaleBar(low, high) {
    return el("div", {class: "scale"}, [el("span", {text: low}), el("span", {class: "bar"}), el("span", {text: high})]);
  }

  function select(id, label, options, value, onChange) {
    const s = el("select", {id: id});
    for (const [v, text] of options) {
      const o = el("option", {value: v, text: text});
      if (v === value) o.selected = true;
      s.appendChild(o);
    }
    s.addEventListener("change", () => onChange(s.value));
    return el("label", {class: "control"}, [label + " ", s]);
  }

  // ---------------------------------------------------------------- heads runs: score map + token view
  const H = R.heads, V = R.view;
  const state = {metric: "agreement", aggregation: "max", split: "select", layer: null, head: null, prompt: 0};

  function headsSection() {
    if (!H) return null;
    const aggs = [...new Set(Object.values(H.maps).map((m) => m.aggregation))];
    const splits = [...new Set(Object.values(H.maps).map((m) => m.split))];
    if (!aggs.includes(state.aggregation)) state.aggregation = aggs[0];
    if (!splits.includes(state.split)) state.split = splits[0];
    const section = el("section", {id: "heads"});
    section.appendChild(el("h2", {text: "Layer x head map"}));
    section.appendChild(el("p", {class: "note", text:
      "Agreement: how often the head's a-weighted vote over the demonstration labels reconstructs the model's " +
      "ICL prediction; accuracy: how often it matches the gold label. Hover a head for its 95% Wilson interval " +
      "and the baseline on the same prompts; click it for the token view. Outlined: the best head of the " +
      "aggregation (chosen on the select split)."}));
    const controls = el("div", {class: "controls"}, [
      select("metric", "score", [["agreement", "agreement with the model"], ["accuracy", "accuracy vs gold"]],
             state.metric, (v) => { state.metric = v; drawMap(); }),
      select("aggregation", "a_i", aggs.map((a) => [a, a]), state.aggregation, (v) => { state.aggregation = v; drawMap(); drawTokens(); }),
      select("split", "prompts", splits.map((s) => [s, s]), state.split, (v) => { state.split = v; drawMap(); }),
    ]);
    section.appendChild(controls);
    section.appendChild(el("div", {class: "row"}, [
      el("div", {}, [el("div", {id: "map-holder"}), scaleBar("0", "1")]),
      el("div", {id: "hover-info", class: "info", text: "Hover a head."})]));
    return section;
  }

  function currentMap() { return H.maps[`${state.split}|${state.aggregation}`]; }

  function hoverText(l, h) {
    const m = currentMap(), c = m.cells[l][h];
    if (!c) return `L${l}.H${h}: no score`;
    const b = H.baselines[m.split] || {};
    const lines = [`Head L${l}.H${h} (${m.aggregation}, ${m.split} prompts)`,
      `${state.metric}: ${rate(c[state.metric])}`, `rank by agreement on select: ${c.rank ?? "n/a"}`];
    if (state.metric === "agreement") lines.push(`baseline, demonstrations' majority label: ${rate(b.demo_majority_agreement)}`);
    else {
      lines.push(`baseline, demonstrations' majority label: ${rate(b.demo_majority_accuracy)}`);
      lines.push(`the model's own ICL accuracy: ${rate(b.icl_accuracy)}`);
    }
    return lines.join("\n");
  }

  function drawMap() {
    const holder = document.getElementById("map-holder");
    if (!holder) return;
    const m = currentMap(), best = H.best[state.aggregation];
    holder.replaceChildren(headGrid("head-map", H.n_layers, H.n_heads, (l, h) => {
      const c = m.cells[l][h], v = c ? c[state.metric].value : null;
      return {value: v, scaled: v, tip: c ? `L${l}.H${h} ${state.metric} ${fmt(v)}` : "",
              mark: best && best[0] === l && best[1] === h};
    }, (l, h) => { document.getElementById("hover-info").textContent = hoverText(l, h); },
    (l, h) => { state.layer = l; state.head = h; markSelected(); drawTokens(); }));
    markSelected();
  }

  function markSelected() {
    for (const td of document.querySelectorAll("#head-map td.cell")) {
      td.classList.toggle("selected", Number(td.dataset.layer) === state.layer && Number(td.dataset.head) === state.head);
    }
  }

  // Attention rows: base64 of little-endian uint16, weight = value / 65535, shape [layer head pos].
  const decoded = new Map();
  function attentionOf(p) {
    if (!decoded.has(p.prompt)) {
      const bytes = Uint8Array.from(atob(p.attention_q16), (ch) => ch.charCodeAt(0));
      const view = new DataView(bytes.buffer), out = new Float64Array(bytes.length / 2);
      for (let i = 0; i < out.length; i++) out[i] = view.getUint16(2 * i, true) / 65535;
      decoded.set(p.prompt, out);
    }
    return decoded.get(p.prompt);
  }

  function tokensSection() {
    const section = el("section", {id: "tokens"});
    section.appendChild(el("h2", {text: "Token view"}));
    if (!V || !V.prompts.length) {
      section.appendChild(el("p", {class: "note", text: "This run kept no token-level attention (view_data.json; " +
        "rerun the heads study with --view-prompts above 0)."}));
      return section;
    }
    section.appendChild(select("prompt", "prompt", V.prompts.map((p) => [String(p.prompt),
      `#${p.prompt} (${p.split}, gold ${V.label_words[p.gold]}, model ${V.label_words[p.model_answer]})`]),
      String(state.prompt), (v) => { state.prompt = Number(v); drawTokens(); }));
    const legend = el("div", {class: "legend"}, [
      el("span", {class: "tok demo_input", text: "x_i demonstration input"}), " ",
      el("span", {class: "tok label", text: "y_i label word"}), " ",
      el("span", {class: "tok query", text: "query"}), " ",
      el("span", {class: "tok pred", text: "prediction position"}), " ",
      "background: the head's attention from the prediction position, scaled to the row's largest weight; underline: the demonstration's label class",
    ]);
    section.appendChild(legend);
    section.appendChild(el("div", {id: "head-label", class: "headline", text: "Click a head in the map."}));
    section.appendChild(el("div", {id: "votes", class: "info"}));
    section.appendChild(el("div", {id: "token-text", class: "prompt"}));
    return section;
  }

  function drawTokens() {
    const box = document.getElementById("token-text");
    if (!box || !V || !V.prompts.length) return;
    const p = V.prompts.find((q) => q.prompt === state.prompt) || V.prompts[0];
    const words = V.label_words, l = state.layer, h = state.head;
    const nPos = p.tokens.length;
    let row = null, top = 0;
    if (l !== null) {
      const att = attentionOf(p), base = (l * p.attention_shape[1] + h) * nPos;
      row = att.subarray(base, base + nPos);
      top = Math.max(...row);
    }
    const spans = p.tokens.map((t, i) => {
      const role = p.roles[i], pred = i === p.prediction_position;
      const shown = t.replace(/\n/g, "\u21b5\n");
      const w = row ? row[i] : null, s = row && top > 0 ? w / top : 0;
      const attrs = {class: `tok ${role}${pred ? " pred" : ""}`, "data-pos": i,
                     title: `#${i} ${JSON.stringify(t)} - ${ROLE_NAMES[role] || role}` +
                            (p.demo[i] >= 0 ? ` of demonstration ${p.demo[i]} (label ${words[p.demo_labels[p.demo[i]]]})` : "") +
                            (row ? ` - attention ${fmt(w, 4)}` : ""),
                     style: `background:rgba(230,85,13,${row ? s.toFixed(3) : 0});` +
                            (p.demo[i] >= 0 ? `border-bottom:3px solid ${CLASS_COLOURS[p.demo_labels[p.demo[i]] % CLASS_COLOURS.length]};` : "")};
      return el("span", attrs, [shown]);
    });
    box.replaceChildren(...spans);
    // tokens without text (a model without a tokenizer: "#<id>") are spaced apart
    box.classList.toggle("symbols", p.tokens.every((t) => /^#\d+$/.test(t)));
    const label = document.getElementById("head-label"), votes = document.getElementById("votes");
    const answer = `model's answer: ${words[p.model_answer]} (gold: ${words[p.gold]}; log-probabilities ` +
      p.model_log_probs.map((x, c) => `${words[c]} ${fmt(x, 2)}`).join(", ") + ")";
    if (l === null) {
      label.textContent = `Prompt #${p.prompt}: click a head in the map to colour the tokens.`;
      votes.textContent = answer;
      return;
    }
    const vote = p.head_vote[state.aggregation][l][h], v = p.votes[state.aggregation][l][h];
    label.textContent = `Head L${l}.H${h} on prompt #${p.prompt} (${p.split}): votes ${vote >= 0 ? words[vote] : "tie (abstains)"}`;
    votes.textContent = [`class votes sum_i a_i [y_i = c] (a_i: ${state.aggregation}): ` +
      v.map((x, c) => `${words[c]} ${fmt(x, 4)}`).join(", "),
      `largest attention weight ${fmt(top, 4)} at token #${row.indexOf(top)} ${JSON.stringify(p.tokens[row.indexOf(top)])}`,
      answer].join("\n");
  }

  // ---------------------------------------------------------------- other studies: per-head tables
  function otherMaps() {
    if (!R.maps.length) return null;
    const section = el("section", {id: "other-maps"});
    section.appendChild(el("h2", {text: "Per-head tables"}));
    section.appendChild(el("p", {class: "note", text: "Each numeric column of a table with layer and head columns, " +
      "colours scaled between the column's smallest and largest value" + (R.map_note ? "; " + R.map_note : "") + "."}));
    let current = 0;
    const holder = el("div", {id: "other-map-holder"});
    const info = el("div", {id: "other-info", class: "info", text: "Hover a head."});
    function draw() {
      const m = R.maps[current], vals = m.cells.flat().filter((x) => x !== null);
      const lo = Math.min(...vals), hi = Math.max(...vals);
      holder.replaceChildren(headGrid("other-map", m.cells.length, m.cells[0].length, (l, h) => {
        const v = m.cells[l][h];
        return {value: v, scaled: v === null ? null : (hi > lo ? (v - lo) / (hi - lo) : 0.5),
                tip: `L${l}.H${h} ${m.column} ${fmt(v, 4)}`, mark: m.marked.some(([a, b]) => a === l && b === h)};
      }, (l, h) => { info.textContent = `${m.table}.${m.column} at L${l}.H${h}: ${fmt(m.cells[l][h], 4)}` +
        (m.marked.some(([a, b]) => a === l && b === h) ? " (outlined: a top head)" : ""); }));
    }
    section.appendChild(select("other-column", "column", R.maps.map((m, i) => [String(i), `${m.table}: ${m.column}`]),
                               "0", (v) => { current = Number(v); draw(); }));
    section.appendChild(el("div", {class: "row"}, [el("div", {}, [holder, scaleBar("column min", "column max")]), info]));
    draw();
    return section;
  }

  function tablesSection() {
    if (!R.tables.length) return null;
    const section = el("section", {id: "tables"});
    section.appendChild(el("h2", {text: "Other tables"}));
    for (const t of R.tables) {
      section.appendChild(el("h3", {text: t.name}));
      const table = el("table", {class: "data"});
      table.appendChild(el("tr", {}, t.columns.map((c) => el("th", {text: c}))));
      for (const r of t.rows) {
        table.appendChild(el("tr", {}, r.map((x) => el("td", {text: typeof x === "number" && !Number.isInteger(x) ? fmt(x, 4) : String(x ?? "")}))));
      }
      section.appendChild(table);
      if (t.more) section.appendChild(el("p", {class: "note", text: `${t.more} more rows in ${t.name}.csv`}));
    }
    return section;
  }

  if (R.headline) app.appendChild(el("p", {id: "headline", class: "note", text: R.headline}));
  for (const s of [headsSection(), H ? tokensSection() : null, otherMaps(), tablesSection()]) if (s) app.appendChild(s);
  if (H) {
    drawMap();
    drawTokens();
  }
  document.body.dataset.ready = "1";
})();
