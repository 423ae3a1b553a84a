// Conveyor dashboard: one EventSource per page (the session cookie authenticates it),
// updating progress bars, statuses and the job timeline in place. Text only ever goes
// in through textContent, so nothing an event carries is parsed as HTML.
"use strict";

(function () {
  const body = document.body;
  const url = body.dataset.stream;
  if (!url) return;

  function each(selector, id, apply) {
    document.querySelectorAll(selector).forEach(function (node) {
      if (node.getAttribute(selector.slice(1, selector.indexOf("]"))) === id) apply(node);
    });
  }

  function showProgress(event) {
    const data = event.data || {};
    each("[data-job]", event.job_id, function (bar) {
      if (typeof data.percent === "number") bar.value = data.percent;
    });
    each("[data-message]", event.job_id, function (span) {
      span.textContent = data.message || data.step || "";
    });
  }

  function showStatus(event) {
    each("[data-status]", event.job_id, function (cell) {
      cell.textContent = event.status;
    });
    if (event.status === "succeeded") {
      each("[data-job]", event.job_id, function (bar) { bar.value = 100; });
    }
  }

  const timeline = body.dataset.timeline ? document.getElementById(body.dataset.timeline) : null;
  function addToTimeline(event) {
    if (!timeline) return;
    const item = document.createElement("li");
    item.className = "event " + event.type;
    const when = document.createElement("time");
    when.textContent = String(event.at).replace("T", " ").slice(0, 19);
    const what = document.createElement("span");
    const data = event.data || {};
    let text = "#" + event.seq + " " + event.type;
    if (event.type === "status") text += ": " + event.status;
    if (typeof data.percent === "number") text += " " + Math.round(data.percent) + "%";
    if (data.message || data.step) text += " " + (data.message || data.step);
    what.textContent = text;
    item.append(when, " ", what);
    timeline.append(item);
  }

  // Re-reads this page and swaps in the parts named by a comma-separated selector list.
  function reread(selectors, done) {
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        done();
        if (!html) return;
        const fresh = new DOMParser().parseFromString(html, "text/html");
        selectors.split(",").forEach(function (selector) {
          const now = fresh.querySelector(selector);
          const current = document.querySelector(selector);
          if (now && current) current.replaceWith(now);
        });
      })
      .catch(done);
  }

  // Pages summarising many things (the overview) are re-read at most once a second.
  // An event arriving while a re-read is in flight asks for one more after it, so
  // that the last event of a burst is always shown.
  const refresh = body.dataset.refresh;
  let pending = null;
  let again = false;
  function refreshSoon() {
    if (!refresh) return;
    if (pending) { again = true; return; }
    pending = setTimeout(function () {
      again = false;
      reread(refresh, function () {
        pending = null;
        if (again) refreshSoon();
      });
    }, 1000);
  }

  // A job page shows its result, attempts and actions anew once the job has ended.
  const final = body.dataset.final;
  const TERMINAL = ["succeeded", "cancelled", "dead"];
  function showEnd(event) {
    if (final && event.type === "status" && TERMINAL.indexOf(event.status) >= 0) {
      reread(final, function () {});
    }
  }

  // A pipeline's graph: a step's node takes its new status at once (its class colours
  // it); the re-read that follows brings the progress of its items.
  const ENDED = ["succeeded", "failed", "cancelled"];
  let source = null;
  function showStep(event) {
    if (event.type === "step" && event.step) {
      each("[data-step]", event.step, function (node) {
        node.setAttribute("class", "node " + event.status);
      });
      each("[data-step-status]", event.step, function (text) {
        text.textContent = event.status;
      });
    }
    if (event.type === "pipeline") {
      const status = document.getElementById("pipeline-status");
      if (status) status.textContent = event.status;
      // Its stream ends here: reconnecting would only find it ended again.
      // A re-read already under way may have missed the end: read once more.
      if (ENDED.indexOf(event.status) >= 0) {
        source.close();
        if (refresh) reread(refresh, function () {});
      }
    }
  }

  source = new EventSource(url);
  function handle(kind) {
    return function (message) {
      let event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      if (kind === "progress") showProgress(event);
      if (kind === "status") showStatus(event);
      if (kind === "step" || kind === "pipeline") showStep(event);
      addToTimeline(event);
      refreshSoon();
      showEnd(event);
    };
  }
  source.addEventListener("progress", handle("progress"));
  source.addEventListener("status", handle("status"));
  source.addEventListener("breaker", handle("breaker"));
  source.addEventListener("step", handle("step"));
  source.addEventListener("pipeline", handle("pipeline"));
  body.dataset.streamOpen = "connecting";
  source.addEventListener("open", function () { body.dataset.streamOpen = "open"; });
  window.addEventListener("pagehide", function () { source.close(); });
})();
