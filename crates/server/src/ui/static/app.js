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
