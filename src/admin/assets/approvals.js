// tokengate web UI: the "Approvals" page (approval requests, approve with a TOTP code, reject
// with a note) and TOTP enrolment. Plain script, no build step, no third-party code. Data from
// the API is rendered with textContent only; the enrolment QR code is an SVG the gateway renders
// itself, parsed as SVG (not HTML) and inserted as a node.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  if (!csrf) return; // not signed in: the tokens page shows the sign-in form

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  async function api(method, path, body) {
    const { ok, status, data } = await window.tokengate.send(method, path, body);
    if (!ok) throw new Error(data.message || ("Request failed (" + status + ")."));
    return data;
  }

  // ---------------------------------------------------------------- the page

  // The tokens page's own heading, hidden while this page shows.
  const tokensH1 = document.querySelector("main > h1");
  const page = el("section", { id: "approvals", "aria-labelledby": "approvals-h", hidden: "" });
  const h = el("h1", { id: "approvals-h" }, "Approvals");
  const back = el("p", {});
  back.append(el("a", { href: "#" }, "Back to API tokens"));
  const mfaCard = el("section", { class: "card", "aria-labelledby": "mfa-h" });
  mfaCard.append(el("h2", { id: "mfa-h" }, "Two-factor authentication (TOTP)"));
  const mfaState = el("p", { id: "mfa-state", class: "muted" });
  const mfaEnrol = el("button", { type: "button", id: "mfa-enrol", class: "primary", hidden: "" }, "Set up an authenticator app");
  const mfaBox = el("div", { id: "mfa-box", class: "reveal", hidden: "" });
  const mfaError = el("p", { id: "mfa-error", class: "error", role: "alert" });
  mfaCard.append(mfaState, mfaEnrol, mfaBox, mfaError);

  const listCard = el("section", { class: "card", "aria-labelledby": "list-h" });
  const head = el("div", { class: "cardhead" });
  head.append(el("h2", { id: "list-h" }, "Approval requests"));
  const filter = el("select", { id: "approvals-filter", "aria-label": "Show" });
  filter.style.width = "auto";
  for (const [v, t] of [["pending", "Pending"], ["", "All"]]) filter.append(el("option", { value: v }, t));
  head.append(filter);
  const wrap = el("div", { class: "tablewrap" });
  const table = el("table", { id: "approvals-table" });
  table.append(el("caption", { class: "sr-only" }, "Approval requests: who asks for what and why, and actions"));
  const thead = el("thead");
  const tr = el("tr");
  for (const t of ["Rule", "Parameters", "Requested by", "Why", "Requested", "Status", "Decision"]) tr.append(el("th", { scope: "col" }, t));
  thead.append(tr);
  const tbody = el("tbody", { id: "approvals-rows" });
  table.append(thead, tbody);
  wrap.append(table);
  const empty = el("p", { id: "approvals-empty", class: "muted", hidden: "" }, "No requests.");
  const listError = el("p", { id: "approvals-error", class: "error", role: "alert" });
  const live = el("p", { id: "approvals-status", class: "ok", role: "status", "aria-live": "polite" });
  listCard.append(head, wrap, empty, listError, live);
  page.append(h, back, mfaCard, listCard);
  $("main").append(page);

  function when(s) { return s ? new Date(s).toLocaleString() : "-"; }

  async function loadMfa() {
    mfaError.textContent = "";
    let m;
    try { m = await api("GET", "/v1/mfa"); } catch (e) { mfaError.textContent = e.message; return; }
    if (!m.configured) {
      mfaState.textContent = "MFA is not configured on this gateway ([admin.mfa] key_file): approvals cannot be decided here.";
      mfaEnrol.hidden = true;
    } else if (m.enrolled) {
      mfaState.textContent = "Set up. " + m.recovery_codes_left + " recovery codes left." +
        (m.step_up_until ? " Verified until " + when(m.step_up_until) + "." : "");
      mfaEnrol.hidden = true;
    } else {
      mfaState.textContent = "Not set up: approving needs a code from an authenticator app.";
      mfaEnrol.hidden = false;
    }
  }

  async function enrol() {
    mfaError.textContent = "";
    let e;
    try { e = await api("POST", "/v1/mfa/enroll"); } catch (err) { mfaError.textContent = err.message; return; }
    mfaBox.replaceChildren();
    mfaBox.append(el("h3", {}, "Scan this code now"), el("p", { class: "hint" }, "It is shown only once. Scan it with your authenticator app, or type the key."));
    if (e.qr_svg) {
      const svg = new DOMParser().parseFromString(e.qr_svg, "image/svg+xml").documentElement;
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", "QR code of the authenticator key");
      svg.setAttribute("width", "200");
      svg.setAttribute("height", "200");
      mfaBox.append(document.importNode(svg, true));
    }
    const key = el("input", { readonly: "", id: "mfa-secret", "aria-label": "Key" });
    key.value = e.secret;
    mfaBox.append(el("p", {}, "Key:"), key);
    mfaBox.append(el("h3", {}, "Recovery codes"), el("p", { class: "hint" }, "Each works once, in place of a code. Store them somewhere safe: they are not shown again."));
    const codes = el("pre", { id: "mfa-recovery" }, e.recovery_codes.join("\n"));
    mfaBox.append(codes);
    const form = el("form", { id: "mfa-confirm", novalidate: "" });
    form.append(el("label", { for: "mfa-code" }, "Code from the app"));
    const code = el("input", { id: "mfa-code", inputmode: "numeric", autocomplete: "one-time-code", maxlength: "6", required: "" });
    form.append(code, el("button", { type: "submit", class: "primary" }, "Confirm"));
    mfaBox.append(form);
    mfaBox.hidden = false;
    mfaEnrol.hidden = true;
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      mfaError.textContent = "";
      try {
        await api("POST", "/v1/mfa/confirm", { code: code.value.trim() });
        mfaBox.hidden = true;
        mfaBox.replaceChildren();
        live.textContent = "Two-factor authentication is set up.";
        loadMfa();
      } catch (err) { mfaError.textContent = err.message; code.focus(); }
    });
    code.focus();
  }

  function decisionCell(a) {
    const td = el("td");
    if (a.status !== "pending") {
      td.textContent = a.decided_by ? a.decided_by + (a.note ? ": " + a.note : "") : "-";
      return td;
    }
    const form = el("form", { class: "decide", novalidate: "" });
    // Layout through the CSSOM (the page's CSP allows no inline style attributes).
    Object.assign(form.style, { display: "flex", flexWrap: "wrap", gap: ".4rem", alignItems: "center" });
    const totp = el("input", { "aria-label": "TOTP code for " + a.id, placeholder: "TOTP code", inputmode: "numeric", autocomplete: "one-time-code", maxlength: "11", size: "8" });
    const note = el("input", { "aria-label": "Note for " + a.id, placeholder: "Note", maxlength: "500", size: "12" });
    const ok = el("button", { type: "submit", class: "primary small", value: "approve" }, "Approve");
    const no = el("button", { type: "submit", class: "danger small", value: "reject" }, "Reject");
    totp.style.width = "7.5rem";
    note.style.width = "11rem";
    form.append(totp, note, ok, no);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const verb = (ev.submitter && ev.submitter.value) || "approve";
      listError.textContent = "";
      try {
        await api("POST", "/v1/approvals/" + encodeURIComponent(a.id) + "/" + verb, { totp: totp.value.trim(), note: note.value.trim() });
        live.textContent = (verb === "approve" ? "Approved " : "Rejected ") + a.rule + ".";
        load();
        loadMfa();
      } catch (err) { listError.textContent = err.message; totp.focus(); }
    });
    td.append(form);
    return td;
  }

  async function load() {
    listError.textContent = "";
    let data;
    const q = filter.value ? "?status=" + encodeURIComponent(filter.value) : "";
    try { data = await api("GET", "/v1/approvals" + q); } catch (e) { listError.textContent = e.message; return; }
    tbody.replaceChildren();
    for (const a of data.approvals) {
      const row = el("tr");
      row.append(el("th", { scope: "row" }, a.rule));
      row.append(el("td", {}, Object.entries(a.params || {}).map(([k, v]) => k + "=" + v).join(", ") || "-"));
      row.append(el("td", {}, a.requested_by.account + " (" + a.requested_by.token_prefix + ")"));
      row.append(el("td", {}, a.message || "-"));
      row.append(el("td", {}, when(a.requested_at)));
      row.append(el("td", {}, a.status + (a.status === "approved" ? " until " + when(a.expires_at) : "")));
      row.append(decisionCell(a));
      tbody.append(row);
    }
    empty.hidden = data.approvals.length !== 0;
  }

  function route() {
    const on = window.location.hash === "#approvals";
    page.hidden = !on;
    if (tokensH1) tokensH1.hidden = on;
    const app = $("app");
    if (app && !$("who").hidden) app.hidden = on;
    if (on) { loadMfa(); load(); }
  }

  const link = $("nav-approvals");
  if (link) link.hidden = false;
  mfaEnrol.addEventListener("click", enrol);
  filter.addEventListener("change", load);
  window.addEventListener("hashchange", route);
  // The tokens page shows itself once its data is loaded: keep it hidden under this page.
  const app = $("app");
  if (app) {
    new MutationObserver(() => {
      if (!page.hidden && !app.hidden) app.hidden = true;
    }).observe(app, { attributes: true, attributeFilter: ["hidden"] });
  }
  // After the tokens page has shown itself.
  window.setTimeout(route, 300);
})();
