// tokengate web UI: the "API tokens" page. Plain script, no build step, no third-party code.
// Data from the API is rendered with textContent only. Mutations send the CSRF token from the
// <meta> tag; the session cookie is HttpOnly and never visible here.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  let me = null;
  let policy = null;

  function announce(msg) {
    const s = $("status");
    s.textContent = "";
    window.setTimeout(() => { s.textContent = msg; }, 30);
  }

  async function api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (method !== "GET") headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
    let data = {};
    try { data = await r.json(); } catch (_) { /* empty body */ }
    if (r.status === 401) {
      showSignin("Your session has ended. Sign in again.");
      throw new Error(data.message || "Not signed in.");
    }
    if (!r.ok) throw new Error(data.message || ("Request failed (" + r.status + ")."));
    return data;
  }

  // ---------------------------------------------------------------- sign-in / sign-out

  function showSignin(message) {
    $("app").hidden = true;
    $("who").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = message || "";
    $("signin-token").focus();
  }

  async function signin(ev) {
    ev.preventDefault();
    const input = $("signin-token");
    const token = input.value.trim();
    $("signin-error").textContent = "";
    if (!token) {
      $("signin-error").textContent = "Paste a token first.";
      input.focus();
      return;
    }
    const r = await fetch("/session", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: JSON.stringify({ token }),
      credentials: "same-origin",
    });
    input.value = "";
    let data = {};
    try { data = await r.json(); } catch (_) { /* empty */ }
    if (!r.ok) {
      $("signin-error").textContent = data.message || ("Sign-in failed (" + r.status + ").");
      input.focus();
      return;
    }
    // Reload so the page carries the new session's CSRF token in its <meta> tag.
    window.location.replace("/");
  }

  async function signout() {
    try { await api("POST", "/session/logout"); } catch (_) { /* already gone */ }
    window.location.replace("/");
  }

  // ---------------------------------------------------------------- the page

  function fmtDate(s) {
    if (!s) return null;
    return s.slice(0, 16).replace("T", " ") + " UTC";
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function timeCell(tr, iso, empty) {
    const td = document.createElement("td");
    if (iso) {
      const t = document.createElement("time");
      t.dateTime = iso;
      t.textContent = fmtDate(iso);
      td.appendChild(t);
    } else {
      td.textContent = empty;
      td.className = "muted";
    }
    tr.appendChild(td);
  }

  function scopesText(scopes) {
    const keys = Object.keys(scopes || {});
    if (!keys.length) return "all";
    return keys.map((k) => k + "=" + scopes[k].join(",")).join("; ");
  }

  async function loadTokens() {
    const data = await api("GET", "/v1/tokens");
    const body = $("tokens");
    body.replaceChildren();
    for (const t of data.tokens) {
      const tr = document.createElement("tr");
      tr.dataset.id = t.id;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = t.name;
      tr.appendChild(name);
      const pc = document.createElement("td");
      const code = document.createElement("code");
      code.textContent = t.prefix;
      pc.appendChild(code);
      tr.appendChild(pc);
      cell(tr, t.account);
      cell(tr, t.role || "custom");
      cell(tr, scopesText(t.scopes), "scopes");
      timeCell(tr, t.created_at, "");
      timeCell(tr, t.expires_at, "never");
      timeCell(tr, t.last_used_at, "never");
      const act = document.createElement("td");
      const b = document.createElement("button");
      b.type = "button";
      b.className = "danger small";
      b.textContent = "Revoke";
      b.setAttribute("aria-label", "Revoke " + t.name + " (" + t.prefix + ")");
      if (me && t.id === me.id) b.title = "This is the token you signed in with: revoking it ends this session.";
      b.addEventListener("click", () => confirmRevoke(t, b));
      act.appendChild(b);
      tr.appendChild(act);
      body.appendChild(tr);
    }
    const n = data.tokens.length;
    $("tokens-empty").hidden = n !== 0;
    $("tokens-count").textContent = n + (n === 1 ? " token" : " tokens") +
      " · limit " + policy.max_active_per_account + " per account";
  }

  function confirmRevoke(t, opener) {
    const dlg = $("confirm");
    $("confirm-text").textContent =
      "\u201c" + t.name + "\u201d (" + t.prefix + ", account " + t.account + ") stops working at once. This cannot be undone.";
    dlg.returnValue = "";
    dlg.onclose = async () => {
      if (dlg.returnValue !== "revoke") { opener.focus(); return; }
      try {
        await api("POST", "/v1/tokens/" + encodeURIComponent(t.id) + "/revoke", { reason: "revoked in the web UI" });
        announce("Revoked " + t.name + ".");
        if (me && t.id === me.id) { window.location.replace("/"); return; }
        await loadTokens();
        $("tokens-h").focus();
      } catch (e) {
        $("issue-error").textContent = e.message;
      }
    };
    dlg.showModal();
  }

  function fillSelect(sel, items, selected) {
    sel.replaceChildren();
    for (const it of items) {
      const o = document.createElement("option");
      o.value = it.value;
      o.textContent = it.label;
      if (it.disabled) o.disabled = true;
      if (it.value === selected) o.selected = true;
      sel.appendChild(o);
    }
  }

  function expiryLabel(e) {
    if (e === "never") return "Never";
    const d = parseInt(e, 10);
    return d + (d === 1 ? " day" : " days");
  }

  function roleHint() {
    const r = policy.roles.find((x) => x.name === $("issue-role").value);
    $("issue-role-hint").textContent = r ? "Permissions: " + r.permissions.join(", ") : "";
  }

  async function issue(ev) {
    ev.preventDefault();
    const err = $("issue-error");
    err.textContent = "";
    const name = $("issue-name").value.trim();
    if (!name) {
      err.textContent = "Give the token a name.";
      $("issue-name").focus();
      return;
    }
    const body = { name, role: $("issue-role").value, expires: $("issue-expiry").value };
    if (me.access === "admin") body.account = $("issue-account").value;
    $("issue-submit").disabled = true;
    try {
      const t = await api("POST", "/v1/tokens", body);
      reveal(t);
      $("issue-name").value = "";
      await loadTokens();
    } catch (e) {
      err.textContent = e.message;
    } finally {
      $("issue-submit").disabled = false;
    }
  }

  function reveal(t) {
    $("reveal-token").value = t.token;
    $("reveal-export").value = "export TOKENGATE_TOKEN=" + t.token;
    $("copy-status").textContent = "";
    const box = $("reveal");
    box.hidden = false;
    $("reveal-live").textContent = "Token " + t.name + " issued. Copy it now: it is shown only once.";
    $("reveal-token").focus();
    $("reveal-token").select();
  }

  function hideReveal() {
    $("reveal-token").value = "";
    $("reveal-export").value = "";
    $("reveal-live").textContent = "";
    $("reveal").hidden = true;
    $("issue-name").focus();
  }

  async function copy(inputId, what) {
    const input = $(inputId);
    let done = false;
    try {
      await navigator.clipboard.writeText(input.value);
      done = true;
    } catch (_) {
      input.select();
      try { done = document.execCommand("copy"); } catch (_) { done = false; }
    }
    $("copy-status").textContent = done ? what + " copied to the clipboard." : "Copy failed: select the text and copy it by hand.";
  }

  async function start() {
    $("signin-form").addEventListener("submit", signin);
    if (!csrf) { showSignin(""); return; }
    try {
      [me, policy] = await Promise.all([api("GET", "/v1/whoami"), api("GET", "/v1/policy")]);
    } catch (e) {
      if ($("signin").hidden) showSignin(e.message);
      return;
    }
    $("who-name").textContent = me.prefix ? me.name + " (" + me.prefix + ")" : me.name;
    $("who-account").textContent = me.account;
    $("who-access").textContent = me.access === "admin" ? "admin: all accounts" : "your account";
    $("who").hidden = false;
    $("signout").addEventListener("click", signout);

    fillSelect($("issue-role"), policy.roles.map((r) => ({
      value: r.name,
      label: r.name + (r.grantable ? "" : " (not allowed for this sign-in)"),
      disabled: !r.grantable,
    })), (policy.roles.find((r) => r.grantable && r.name === "viewer") || policy.roles.find((r) => r.grantable) || {}).name);
    roleHint();
    $("issue-role").addEventListener("change", roleHint);
    fillSelect($("issue-expiry"), policy.expiry.allowed.map((e) => ({ value: e, label: expiryLabel(e) })), policy.expiry.default);
    if (me.access === "admin") {
      const acc = await api("GET", "/v1/accounts");
      fillSelect($("issue-account"), acc.accounts.filter((a) => a.status === "active").map((a) => ({ value: a.name, label: a.name })), me.account);
      $("issue-account-field").hidden = false;
    }
    $("issue-form").addEventListener("submit", issue);
    $("copy-raw").addEventListener("click", () => copy("reveal-token", "Token"));
    $("copy-export").addEventListener("click", () => copy("reveal-export", "Export line"));
    $("reveal-done").addEventListener("click", hideReveal);
    $("tokens-h").tabIndex = -1;
    $("app").hidden = false;
    await loadTokens();
  }

  document.addEventListener("DOMContentLoaded", () => {
    start().catch((e) => { $("issue-error").textContent = e.message; });
  });
})();
