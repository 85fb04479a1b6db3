// tokengate web UI: the "API tokens" page. Plain script, no build step, no third-party code.
// Data from the API is rendered with textContent only. Mutations send the CSRF token from the
// <meta> tag; the session cookie is HttpOnly and never visible here.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  let me = null;
  let policy = null;
  let allTokens = [];
  const DAY = 86400000;
  const EXPIRING_DAYS = 14;
  const STALE_DAYS = 90;

  function announce(msg) {
    const s = $("status");
    s.textContent = "";
    window.setTimeout(() => { s.textContent = msg; }, 30);
  }

  async function api(method, path, body) {
    const { ok, status, data } = await window.tokengate.send(method, path, body);
    if (status === 401) {
      showSignin("Your session has ended. Sign in again.");
      throw new Error(data.message || "Not signed in.");
    }
    if (!ok) throw new Error(readable(status, data));
    return data;
  }

  // An API refusal in a sentence a person can act on; the API's own words stay in the details.
  function readable(status, data) {
    const code = data.error || "";
    if (code === "token_limit") {
      const limit = policy ? policy.max_active_per_account : null;
      return "This account already has " + (limit ? limit + " active tokens, the most it may have" : "as many active tokens as it may have") +
        ". Revoke one it no longer needs in the table below, then issue again.";
    }
    if (status === 403) {
      const perm = data.required_permission ? " (it needs " + data.required_permission + ")" : "";
      return "Your sign-in is not allowed to do this" + perm + ". " + firstSentence(data.message);
    }
    if (status === 409) return firstSentence(data.message) || "That conflicts with the current state; reload the page.";
    if (status === 429) return "Too many requests: wait a moment and try again.";
    if (status >= 500) return "The gateway could not do this right now (" + status + "). Try again in a moment.";
    return firstSentence(data.message) || ("The request failed (" + status + ").");
  }

  function firstSentence(m) {
    if (!m) return "";
    const i = m.search(/[.!?](\s|$)/);
    return i < 0 ? m : m.slice(0, i + 1);
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

  function cell(tr, text, cls, label) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    if (label) td.dataset.label = label;
    tr.appendChild(td);
    return td;
  }

  function timeCell(tr, iso, empty, label) {
    const td = document.createElement("td");
    td.dataset.label = label;
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

  function ageDays(iso) {
    return iso ? (Date.now() - Date.parse(iso)) / DAY : null;
  }

  function isExpiring(t) {
    return t.status === "active" && !!t.expires_at && (Date.parse(t.expires_at) - Date.now()) <= EXPIRING_DAYS * DAY;
  }

  function isStale(t) {
    return t.status === "active" && ageDays(t.last_used_at || t.created_at) >= STALE_DAYS;
  }

  function matchesView(t, view) {
    if (view === "active") return t.status === "active";
    if (view === "expiring") return isExpiring(t);
    if (view === "stale") return isStale(t);
    return true;
  }

  async function loadTokens() {
    const data = await api("GET", "/v1/tokens?all=true");
    allTokens = data.tokens;
    const accounts = [...new Set(allTokens.map((t) => t.account))].sort();
    const sel = $("filter-account");
    const keep = sel.value;
    fillSelect(sel, [{ value: "", label: "All accounts" }].concat(accounts.map((a) => ({ value: a, label: a }))), keep);
    render();
  }

  function render() {
    const q = $("filter-q").value.trim().toLowerCase();
    const account = $("filter-account").value;
    const view = $("filter-view").value;
    const rows = allTokens.filter((t) =>
      matchesView(t, view) &&
      (!account || t.account === account) &&
      (!q || [t.name, t.prefix, t.account, t.id].some((x) => (x || "").toLowerCase().includes(q))));
    const body = $("tokens");
    body.replaceChildren();
    for (const t of rows) {
      const tr = document.createElement("tr");
      tr.dataset.id = t.id;
      const name = document.createElement("th");
      name.scope = "row";
      name.dataset.label = "Name";
      name.textContent = t.name;
      if (me && t.id === me.id) {
        tr.classList.add("mine");
        const you = document.createElement("span");
        you.className = "you";
        you.textContent = "this is you";
        you.title = "The token you signed in with";
        name.append(" ", you);
      }
      tr.appendChild(name);
      const pc = document.createElement("td");
      pc.dataset.label = "Prefix";
      const code = document.createElement("code");
      code.textContent = t.prefix;
      pc.appendChild(code);
      tr.appendChild(pc);
      cell(tr, t.account, null, "Account");
      cell(tr, t.role || "custom", null, "Role");
      cell(tr, scopesText(t.scopes), "scopes", "Scopes");
      timeCell(tr, t.created_at, "", "Created");
      timeCell(tr, t.expires_at, "never", "Expires");
      timeCell(tr, t.last_used_at, "never", "Last used");
      const st = cell(tr, statusText(t), "status-" + (isExpiring(t) ? "expiring" : isStale(t) ? "stale" : t.status), "Status");
      st.classList.add("status");
      const act = document.createElement("td");
      act.className = "act";
      if (t.status === "active") {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "danger small";
        b.textContent = "Revoke";
        b.setAttribute("aria-label", "Revoke " + t.name + " (" + t.prefix + ")");
        if (me && t.id === me.id) b.title = "This is the token you signed in with: revoking it ends this session.";
        b.addEventListener("click", () => confirmRevoke(t, b));
        act.appendChild(b);
      }
      tr.appendChild(act);
      body.appendChild(tr);
    }
    const n = rows.length;
    const active = allTokens.filter((t) => t.status === "active").length;
    $("tokens-empty").hidden = n !== 0;
    $("tokens-empty").textContent = allTokens.length ? "No token matches these filters." : "No tokens yet.";
    $("tokens-count").textContent = "showing " + n + " of " + allTokens.length + " · " + active + " active · limit " +
      policy.max_active_per_account + " per account";
    $("tokens-h").textContent = { active: "Active tokens", expiring: "Expiring tokens", stale: "Stale tokens", all: "All tokens" }[view];
  }

  function statusText(t) {
    if (isExpiring(t)) return "expiring";
    if (isStale(t)) return "stale";
    return t.status;
  }

  function confirmRevoke(t, opener) {
    const dlg = $("confirm");
    const self = me && t.id === me.id;
    $("confirm-h").textContent = self ? "Revoke the token you are signed in with?" : "Revoke this token?";
    $("confirm-revoke").textContent = self ? "Revoke and sign out" : "Revoke";
    $("confirm-text").textContent = self
      ? "\u201c" + t.name + "\u201d (" + t.prefix + ") is the token you signed in with. Revoking it signs you out of this page at once, " +
        "and every script or CLI profile that uses it stops working. This cannot be undone."
      : "\u201c" + t.name + "\u201d (" + t.prefix + ", account " + t.account + ") stops working at once. This cannot be undone.";
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
        $("tokens-error").textContent = e.message;
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

  // A sign-in whose token holds custom permissions (no role it may grant) can still issue a
  // token with its own permissions, minus the token-management ones: never stronger than itself.
  const CUSTOM = "\u0000custom";
  function customPermissions() {
    return (me.permissions || []).filter((p) => !p.startsWith("tokengate:"));
  }

  function roleHint() {
    const v = $("issue-role").value;
    if (v === CUSTOM) {
      $("issue-role-hint").textContent = "Permissions: " + customPermissions().join(", ") + " (those of your sign-in)";
      return;
    }
    const r = policy.roles.find((x) => x.name === v);
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
    const role = $("issue-role").value;
    if (!role) {
      err.textContent = "Your sign-in may not grant any role here: ask an administrator for a token.";
      return;
    }
    const body = role === CUSTOM
      ? { name, permissions: customPermissions(), expires: $("issue-expiry").value }
      : { name, role, expires: $("issue-expiry").value };
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

    const roleItems = policy.roles.map((r) => ({
      value: r.name,
      label: r.name + (r.grantable ? "" : " (not allowed for this sign-in)"),
      disabled: !r.grantable,
    }));
    if (customPermissions().length) {
      roleItems.unshift({ value: CUSTOM, label: "Same permissions as your sign-in (" + customPermissions().join(", ") + ")" });
    }
    const preferred = policy.roles.find((r) => r.grantable && r.name === "viewer") || policy.roles.find((r) => r.grantable);
    fillSelect($("issue-role"), roleItems, preferred ? preferred.name : (customPermissions().length ? CUSTOM : ""));
    roleHint();
    $("issue-role").addEventListener("change", roleHint);
    // A token never outlives the sign-in that issues it (unless an admin issues it): presets
    // past the sign-in's own expiry are offered greyed out, with the reason.
    const limit = me.access !== "admin" && me.expires_at ? Date.parse(me.expires_at) : null;
    const beyond = (e) => limit !== null && (e === "never" || Date.now() + parseInt(e, 10) * DAY > limit);
    const expiries = policy.expiry.allowed.map((e) => ({
      value: e,
      label: expiryLabel(e) + (beyond(e) ? " (beyond your sign-in's expiry)" : ""),
      disabled: beyond(e),
    }));
    const usable = expiries.filter((e) => !e.disabled);
    const preset = usable.find((e) => e.value === policy.expiry.default) || usable[usable.length - 1] || {};
    fillSelect($("issue-expiry"), expiries, preset.value);
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
    for (const id of ["filter-q", "filter-account", "filter-view"]) $(id).addEventListener("input", render);
    $("app").hidden = false;
    await loadTokens();
  }

  document.addEventListener("DOMContentLoaded", () => {
    start().catch((e) => { $("issue-error").textContent = e.message; });
  });
})();
