// Drover dashboard: progressive enhancement only; every page works without it.
// Live updates over the server's event streams are added page by page.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // Ask before stopping an agent (the form still works without JavaScript).
  document.querySelectorAll("button.danger").forEach(function (b) {
    b.addEventListener("click", function (e) {
      if (!window.confirm("Stop this agent? What it runs is cancelled.")) {
        e.preventDefault();
      }
    });
  });
});

// ---- Jobs pages (issue 15, ui-jobs) ----
// A job's page that is still running has an element with data-live-job:
// follow the job's events (its new output and state changes) and show
// them. Text only ever goes in through textContent.
document.addEventListener("DOMContentLoaded", function () {
  var log = document.querySelector("[data-live-job]");
  if (!log || !window.EventSource) {
    return;
  }
  var id = log.getAttribute("data-live-job");
  var after = log.getAttribute("data-after") || "0";
  var source = new EventSource("/ui/jobs/" + encodeURIComponent(id) +
    "/events?after=" + encodeURIComponent(after));

  function setBadge(container, b) {
    if (!container || !b) {
      return;
    }
    var badge = container.querySelector(".badge");
    if (!badge) {
      badge = document.createElement("span");
      container.textContent = "";
      container.appendChild(badge);
    }
    badge.className = "badge badge-" + b.tone;
    badge.setAttribute("data-state", b.state);
    badge.textContent = "";
    var icon = document.createElement("span");
    icon.className = "icon";
    icon.setAttribute("aria-hidden", "true");
    icon.textContent = b.icon;
    badge.appendChild(icon);
    badge.appendChild(document.createTextNode(" " + b.label));
  }

  function setText(sel, root, text) {
    var el = (root || document).querySelector(sel);
    if (el && text !== null && text !== undefined) {
      el.textContent = String(text);
    }
  }

  source.addEventListener("log", function (e) {
    var chunk;
    try { chunk = JSON.parse(e.data); } catch (err) { return; }
    var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.appendChild(document.createTextNode(chunk.text));
    log.setAttribute("data-after", String(chunk.cursor));
    if (atEnd) {
      log.scrollTop = log.scrollHeight;
    }
  });

  source.addEventListener("state", function (e) {
    var s;
    try { s = JSON.parse(e.data); } catch (err) { return; }
    setBadge(document.getElementById("job-state"), s.job);
    setText("#job-reason", null, s.reason || "—");
    if (s.finished_at) {
      setText("#job-ended", null, s.finished_at);
    }
    (s.attempts || []).forEach(function (a) {
      var row = document.querySelector("tr[data-attempt=\"" + a.id + "\"]");
      if (!row) {
        return;
      }
      setBadge(row.querySelector(".attempt-state"), a.badge);
      if (a.exit_code !== null && a.exit_code !== undefined) {
        setText(".exit-code", row, a.exit_code);
      }
      if (a.started_at) {
        setText(".attempt-started", row, a.started_at);
      }
      if (a.finished_at) {
        setText(".attempt-ended", row, a.finished_at);
      }
      setText(".attempt-reason", row, a.reason || "—");
    });
    if (s.ended) {
      var cancel = document.getElementById("cancel");
      if (cancel) {
        cancel.hidden = true;
      }
    }
  });

  source.addEventListener("end", function () {
    source.close();
    var note = document.getElementById("live-note");
    if (note) {
      note.textContent = "The job has ended; all its output is shown.";
    }
  });
});

// ---- Workflows (issue 15): the run page follows its run live. ----
// The graph's wrapper carries data-live-run and data-events (the page's
// own event stream, resuming after the event the page was drawn at). Each
// `task` event updates the task's node exactly as workflow/graph.rs
// documents (data-state, class, glyph, words, title; text only) and the
// task's row of the tasks table; the run's end updates the run's badge,
// hides the cancel form and closes the stream.
document.addEventListener("DOMContentLoaded", function () {
  var wrap = document.querySelector("[data-live-run]");
  if (!wrap || !window.EventSource || !window.JSON) { return; }
  var svg = wrap.querySelector("svg");
  var table = document.getElementById("tasks");
  function parse(text) {
    try { return JSON.parse(text || "{}"); } catch (e) { return {}; }
  }
  var glyphs = parse(svg && svg.getAttribute("data-glyphs"));
  var words = parse(svg && svg.getAttribute("data-words"));
  var badges = parse(table && table.getAttribute("data-badges"));

  function setBadge(badge, state) {
    if (!badge) { return; }
    var parts = badges[state] || ["\u2022", "off"];
    badge.className = "badge badge-" + parts[1];
    badge.setAttribute("data-state", state);
    var icon = badge.querySelector(".icon");
    if (icon) { icon.textContent = parts[0]; }
    var last = badge.lastChild;
    var label = " " + state.replace(/_/g, " ");
    if (last && last.nodeType === 3) { last.nodeValue = label; }
    else { badge.appendChild(document.createTextNode(label)); }
  }

  var FINAL = ["succeeded", "failed", "timed_out", "cancelled", "skipped"];

  // A time as the server writes it: "2026-01-02 03:04:05 UTC".
  function setTime(cell, at) {
    var m = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)/.exec(at || "");
    if (cell && m) { cell.textContent = m[1] + " " + m[2] + " UTC"; }
  }

  function taskEvent(ev) {
    var state = ev.state, task = ev.task;
    if (!state || !task || !words.hasOwnProperty(state)) { return; }
    var g = document.getElementById("task-" + task);
    if (g) {
      g.setAttribute("data-state", state);
      g.setAttribute("class", "task state-" + state);
      var glyph = g.querySelector(".glyph");
      if (glyph) { glyph.textContent = glyphs[state] || ""; }
      var text = g.querySelector("text.state");
      if (text) { text.textContent = words[state]; }
      var title = g.querySelector("title");
      if (title) { title.textContent = task + ": " + words[state]; }
    }
    if (table) {
      var rows = table.querySelectorAll("tbody tr");
      for (var i = 0; i < rows.length; i++) {
        if (rows[i].getAttribute("data-task") === task) {
          var row = rows[i];
          setBadge(row.querySelector("td.state .badge"), state);
          var why = row.querySelector("td.why");
          var job = /^job ([0-9a-f-]+)$/.exec(ev.message || "");
          if (job) {
            // The queued event names the task's new job.
            var cell = row.querySelector("td.job");
            if (cell && !cell.querySelector("code")) {
              var code = document.createElement("code");
              code.textContent = job[1];
              cell.textContent = "";
              cell.appendChild(code);
            }
            setTime(row.querySelector("td.started"), ev.at);
          }
          if (why) { why.textContent = job ? "" : (ev.message || ""); }
          if (FINAL.indexOf(state) >= 0) { setTime(row.querySelector("td.ended"), ev.at); }
        }
      }
    }
  }

  var source = new EventSource(wrap.getAttribute("data-events"));
  source.addEventListener("task", function (e) { taskEvent(parse(e.data)); });
  source.addEventListener("run", function (e) {
    var ev = parse(e.data);
    if (!ev.state) { return; }
    setBadge(document.querySelector("#run-state .badge"), ev.state);
    if (ev.state !== "running" && ev.state !== "awaiting_approval") {
      var cancel = document.getElementById("cancel");
      if (cancel) { cancel.hidden = true; }
      setTime(document.getElementById("run-ended"), ev.at);
      var reason = document.getElementById("run-reason");
      if (reason) { reason.textContent = ev.message || ""; }
      wrap.removeAttribute("data-live-run");
      wrap.setAttribute("data-ended", ev.state);
      source.close();
    }
  });
});
