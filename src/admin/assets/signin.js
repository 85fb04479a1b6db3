// tokengate web UI: the single sign-on button. Shown when the gateway has [admin.oidc]; the link
// starts the OpenID Connect sign-in (GET /oidc/login), which comes back to this page.
"use strict";

(function () {
  document.addEventListener("DOMContentLoaded", () => {
    const on = document.querySelector('meta[name="oidc"]');
    const sso = document.getElementById("sso");
    if (!on || on.content !== "on" || !sso) return;
    const back = window.location.hash ? "/" + window.location.hash : "/";
    document.getElementById("sso-button").href = "/oidc/login?return_to=" + encodeURIComponent(back);
    sso.hidden = false;
  });
})();
