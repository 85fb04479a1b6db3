// tokengate web UI: the "Sessions" section. Lists the signed-in person's (or token's) sessions
// (GET /v1/sessions), revokes one (DELETE /v1/sessions/{id}) or all (POST
// /v1/sessions/revoke-all). Data is rendered with textContent only; mutations send the CSRF token.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  async function call(method, path) {
    const { ok, status, data } = await window.tokengate.send(method, path);
    if (!ok) throw new Error(data.message || ("Request failed (" + status + ")."));
    return data;
  }

  function when(s) {
    return s ? new Date(s).toLocaleString() : "";
  }

  function cell(tr, text, label) {
    const td = document.createElement("td");
    td.textContent = text || "";
    td.dataset.label = label;
    tr.appendChild(td);
  }

  async function load() {
    const data = await call("GET", "/v1/sessions");
    const body = $("sessions-list");
    body.replaceChildren();
    for (const s of data.sessions) {
      const tr = document.createElement("tr");
      tr.dataset.session = s.id;
      cell(tr, (s.email || s.token_id || s.sub || "") + (s.current ? " (this browser)" : ""), "Signed in as");
      cell(tr, s.client_ip, "From");
      cell(tr, when(s.created_at), "Started");
      cell(tr, when(s.last_seen_at), "Last active");
      cell(tr, when(s.expires_at), "Ends");
      const td = document.createElement("td");
      td.className = "act";
      const b = document.createElement("button");
      b.type = "button";
      b.className = "danger";
      b.textContent = s.current ? "Sign out" : "Revoke";
      b.setAttribute("aria-label", "Revoke session started " + when(s.created_at));
      b.addEventListener("click", async () => {
        try {
          await call("DELETE", "/v1/sessions/" + encodeURIComponent(s.id));
          if (s.current) { window.location.reload(); return; }
          await load();
        } catch (e) { $("sessions-error").textContent = e.message; }
      });
      td.appendChild(b);
      tr.appendChild(td);
      body.appendChild(tr);
    }
    $("sessions").hidden = false;
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!csrf || !$("sessions")) return;
    $("sessions-revoke-all").addEventListener("click", async () => {
      try {
        await call("POST", "/v1/sessions/revoke-all");
        window.location.reload();
      } catch (e) { $("sessions-error").textContent = e.message; }
    });
    load().catch(() => { /* not signed in: app.js shows the sign-in form */ });
  });
})();
