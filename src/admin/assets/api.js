// tokengate web UI: how every part of the page calls the gateway's API (loaded before the other
// scripts). A JSON request with the session cookie, never cached; a mutation carries the CSRF
// token from the <meta> tag. Answers { ok, status, data }, data being the parsed JSON body ({}
// when there is none); what a refusal means is each caller's to say.
"use strict";

window.tokengate = {
  async send(method, path, body) {
    const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
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
    return { ok: r.ok, status: r.status, data };
  },
};
