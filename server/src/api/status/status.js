// paramd's status page: polls the JSON API once a second and draws every
// value with textContent or SVG attributes, never as markup.
"use strict";
(() => {
  const POLL_MS = 1000;
  // Points fetched for a job's first drawing, and kept before thinning.
  const FIRST_POINTS = 1000;
  const MAX_POINTS = 4000;
  const SVG = "http://www.w3.org/2000/svg";
  const state = { selected: null, jobs: [], histories: new Map(), seen: new Map() };
  const $ = (selector) => document.querySelector(selector);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, String(v));
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  function fmt(x) {
    if (x === null || x === undefined) return "–";
    if (typeof x !== "number") return String(x);
    if (!Number.isFinite(x)) return String(x);
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= 1e5 || a < 1e-3) return x.toExponential(3);
    return String(Number(x.toPrecision(4)));
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = Number(n);
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return (i === 0 ? String(v) : v.toFixed(1)) + " " + units[i];
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store" });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
    return body;
  }

  function historyURL(job, since, every) {
    return "/api/v1/jobs/" + encodeURIComponent(job) + "/history?since=" + since + "&every=" + every;
  }

  // The selected job's history: the newest rounds first (thinned to
  // FIRST_POINTS), then each poll's new rounds.
  async function loadHistory(job) {
    let h = state.histories.get(job.job);
    if (h && job.round < h.last + 1) h = undefined; // re-created under its name
    if (h && job.round <= h.last + 1) return h;
    const since = h ? h.last + 1 : 0;
    const every = h ? 1 : Math.max(1, Math.ceil(job.round / FIRST_POINTS));
    const body = await getJSON(historyURL(job.job, since, every));
    if (!h) h = { rounds: [], last: -1, groups: body.groups, maxNorm: body.max_norm };
    for (const e of body.rounds) {
      if (e.round > h.last) {
        h.rounds.push(e);
        h.last = e.round;
      }
    }
    while (h.rounds.length > MAX_POINTS) {
      const n = h.rounds.length;
      h.rounds = h.rounds.filter((_, i) => i % 2 === 0 || i === n - 1);
    }
    state.histories.set(job.job, h);
    return h;
  }

  // Rounds per second of every job, from the rounds completed between polls.
  function rate(job, now) {
    const prev = state.seen.get(job.job);
    state.seen.set(job.job, { round: job.round, t: now, rate: prev ? prev.rate : null });
    if (!prev || job.round < prev.round || now <= prev.t) return prev ? prev.rate : null;
    const r = ((job.round - prev.round) * 1000) / (now - prev.t);
    const smooth = prev.rate === null ? r : 0.7 * prev.rate + 0.3 * r;
    state.seen.get(job.job).rate = smooth;
    return smooth;
  }

  // Workers pushed of W, and the late ones while a round is open.
  function workers(job) {
    const late = job.waiting_for || [];
    const text = job.workers_pushed + " of " + job.workers_expected;
    if (late.length === 0) return text;
    const more = job.workers_expected - job.workers_pushed > late.length ? ", …" : "";
    return text + " (waiting for " + late.join(", ") + more + ")";
  }

  function shardsSummary(job) {
    const up = job.shards.filter((s) => s.up).length;
    return up + " of " + job.shards.length + " up";
  }

  function renderJobs(now) {
    const body = $("#jobs tbody");
    const rows = state.jobs.map((job) => {
      const last = job.last || {};
      const tr = el(
        "tr",
        { "data-job": job.job, class: job.job === state.selected ? "selected" : "" },
        el("td", {}, job.job),
        el("td", {}, job.optimizer),
        el("td", { class: "num" }, job.round),
        el("td", { class: "num" }, job.step),
        el("td", { class: "num" }, workers(job)),
        el("td", { class: "num" }, job.rounds_skipped),
        el("td", {}, (last.lr || []).map(fmt).join(", ") || "–"),
        el("td", { class: "num" }, fmt(last.grad_norm)),
        el("td", { class: "num" }, fmt(last.clip_coefficient)),
        el("td", { class: "num" }, fmt(rate(job, now))),
        el("td", { class: job.shards.every((s) => s.up) ? "ok" : "bad" }, shardsSummary(job)),
      );
      tr.addEventListener("click", () => {
        location.hash = encodeURIComponent(job.job);
      });
      return tr;
    });
    body.replaceChildren(...rows);
    $("#no-jobs").hidden = state.jobs.length > 0;
  }

  // A line chart of `lines` (each a list of [round, value]) over the
  // rounds; `limit` draws a dashed horizontal line (max_norm).
  function chart(series, title, unit, lines, limit) {
    const rounds = lines.length ? lines[0].points.length : 0;
    const fig = el("figure", { class: "chart", "data-series": series, "data-points": rounds });
    fig.append(el("figcaption", {}, title, " ", el("span", { class: "muted" }, unit)));
    const W = 420;
    const H = 180;
    const pad = { l: 52, r: 8, t: 8, b: 18 };
    const s = svg("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img" });
    const finite = lines.flatMap((l) => l.points).filter((p) => Number.isFinite(p[1]));
    if (limit !== null && limit !== undefined) finite.push([NaN, limit]);
    let x0 = Infinity;
    let x1 = -Infinity;
    let y0 = Infinity;
    let y1 = -Infinity;
    for (const [x, y] of finite) {
      if (Number.isFinite(x)) {
        x0 = Math.min(x0, x);
        x1 = Math.max(x1, x);
      }
      y0 = Math.min(y0, y);
      y1 = Math.max(y1, y);
    }
    if (!Number.isFinite(x0)) {
      x0 = 0;
      x1 = 1;
    }
    if (!Number.isFinite(y0)) {
      y0 = 0;
      y1 = 1;
    }
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) {
      y1 += Math.abs(y1) * 0.05 || 1;
      y0 -= Math.abs(y0) * 0.05 || 0;
    }
    const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (W - pad.l - pad.r);
    const Y = (y) => H - pad.b - ((y - y0) / (y1 - y0)) * (H - pad.t - pad.b);
    s.append(svg("line", { class: "axis", x1: pad.l, y1: H - pad.b, x2: W - pad.r, y2: H - pad.b }));
    s.append(svg("line", { class: "axis", x1: pad.l, y1: pad.t, x2: pad.l, y2: H - pad.b }));
    const label = (x, y, text, anchor) => {
      const t = svg("text", { x, y, "text-anchor": anchor });
      t.textContent = text;
      s.append(t);
    };
    label(pad.l - 4, pad.t + 8, fmt(y1), "end");
    label(pad.l - 4, H - pad.b, fmt(y0), "end");
    label(pad.l, H - 4, "round " + fmt(x0), "start");
    label(W - pad.r, H - 4, fmt(x1), "end");
    if (limit !== null && limit !== undefined) {
      s.append(svg("line", { class: "limit", x1: pad.l, x2: W - pad.r, y1: Y(limit), y2: Y(limit) }));
    }
    lines.forEach((line, i) => {
      const pts = line.points
        .filter((p) => Number.isFinite(p[1]))
        .map(([x, y]) => X(x).toFixed(1) + "," + Y(y).toFixed(1))
        .join(" ");
      s.append(svg("polyline", { class: "g" + (i % 6), "data-line": line.name, points: pts }));
    });
    fig.append(s);
    return fig;
  }

  function renderDetail(job, h) {
    const detail = $("#detail");
    if (!job) {
      detail.hidden = true;
      return;
    }
    detail.hidden = false;
    $("#detail-name").textContent = job.job;
    const last = job.last || {};
    const recent = h.rounds.slice(-20);
    const seconds = recent.reduce((a, e) => a + e.seconds, 0);
    const facts = [
      ["optimizer", job.optimizer],
      ["param groups", h.groups],
      ["parameters", job.parameters + " (" + bytes(job.parameter_bytes) + ", state " + bytes(job.optimizer_state_bytes) + ")"],
      ["round", job.round],
      ["optimizer step", job.step],
      ["workers pushed", workers(job)],
      ["rounds skipped", job.rounds_skipped],
      ["last lr per group", (last.lr || []).map(fmt).join(", ") || "–"],
      ["last grad norm", fmt(last.grad_norm) + (h.maxNorm ? " (max_norm " + fmt(h.maxNorm) + ")" : "")],
      ["last clip coefficient", fmt(last.clip_coefficient)],
      ["rounds per second", seconds > 0 ? fmt(recent.length / seconds) : "–"],
    ];
    $("#facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));

    const r = h.rounds;
    const series = (name, f) => ({ name, points: r.map((e) => [e.round, f(e)]) });
    const lrs = [];
    for (let g = 0; g < h.groups; g += 1) lrs.push(series("group " + g, (e) => e.lr[g]));
    $("#charts").replaceChildren(
      chart("lr", "learning rate", "per param group", lrs, null),
      chart("grad_norm", "grad norm", h.maxNorm ? "before clipping; dashed: max_norm" : "before clipping", [series("grad_norm", (e) => e.grad_norm)], h.maxNorm),
      chart("clip_coefficient", "clip coefficient", "1: not clipped", [series("clip_coefficient", (e) => e.clip_coefficient)], null),
      chart("round_seconds", "round time", "seconds between completed rounds", [series("seconds", (e) => e.seconds)], null),
    );

    const shards = job.shards.map((s) =>
      el(
        "tr",
        {},
        el("td", { class: "num" }, s.index),
        el("td", {}, s.address || "(this process)"),
        el("td", { class: s.up ? "ok" : "bad" }, s.up ? "up" : "down"),
        el("td", { class: "num" }, s.chunks),
        el("td", { class: "num" }, bytes(s.parameter_bytes)),
        el("td", { class: "num" }, bytes(s.optimizer_state_bytes)),
        el("td", { class: "num" }, s.round),
        el("td", { class: s.error ? "bad" : "muted" }, s.error || "–"),
      ),
    );
    $("#shards tbody").replaceChildren(...shards);
    document.body.dataset.job = job.job;
    document.body.dataset.round = String(job.round);
    document.body.dataset.drawn = String(h.rounds.length);
  }

  async function tick() {
    try {
      const status = await getJSON("/api/v1/jobs");
      const now = Date.now();
      state.jobs = status.jobs || [];
      const names = state.jobs.map((j) => j.job);
      for (const name of [...state.histories.keys()]) {
        if (!names.includes(name)) state.histories.delete(name);
      }
      const wanted = decodeURIComponent(location.hash.slice(1));
      if (names.includes(wanted)) state.selected = wanted;
      else if (!names.includes(state.selected)) state.selected = names[0] || null;
      const job = state.jobs.find((j) => j.job === state.selected);
      const h = job ? await loadHistory(job) : null;
      renderJobs(now);
      renderDetail(job, h);
      $("#state").textContent = "updated " + new Date(now).toLocaleTimeString();
      $("#state").className = "muted";
    } catch (e) {
      $("#state").textContent = "cannot reach paramd: " + e.message;
      $("#state").className = "bad";
    }
    setTimeout(tick, POLL_MS);
  }

  window.addEventListener("hashchange", () => {
    state.selected = decodeURIComponent(location.hash.slice(1));
  });
  tick();
})();
