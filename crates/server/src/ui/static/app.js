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
