// Browser test of signing in with OpenID Connect, in Debian's headless Chromium, against a real
// provider (the certified oidc-provider package, tests/oidc/provider.mjs) and a real gateway
// (`tokengate serve`): a person clicks "Sign in with single sign-on", types their login at the
// provider, comes back signed in, issues a token for their own account (and only within their
// policy and the per-account cap), sees and revokes their sessions, and signs out everywhere.
// The audit log tells the story with the person's identity.
//
// Usage: node oidc.test.mjs   (env: TOKENGATE_BIN, CHROMIUM, SCREENSHOT_DIR)
import path from "node:path";
import assert from "node:assert/strict";
import {
  appsReadRule, deployRule, gatewayConfig, launchBrowser, oidcAdmin, openPage, prepareGateway, runSteps,
  settledAudit, shots, signOutWith, startGateway, startProvider, startUpstream, step, whoamiStatus,
} from "./harness.mjs";

// ------------------------------------------------------------------ the OpenID provider
const issuer = await startProvider();

// ------------------------------------------------------------------ recording upstream
const { url: upstreamUrl } = await startUpstream();

// ------------------------------------------------------------------ gateway
const { dir, cli, config } = prepareGateway("tokengate-oidc-ui-", gatewayConfig({
  upstream: upstreamUrl,
  admin: oidcAdmin(issuer),
  sections: "[tokens]\nmax_active_per_account = 2\n",
  rules: appsReadRule + deployRule(),
}), { clientSecret: true });
cli("store", "init");
const { publicUrl, adminUrl } = await startGateway(config);

// ------------------------------------------------------------------ the browser
const browser = await launchBrowser();
const { context, page, consoleErrors } = await openPage(browser, { viewport: { width: 1280, height: 900 } });

async function signIn(p, login) {
  await p.goto(adminUrl + "/");
  await p.getByRole("link", { name: "Sign in with single sign-on" }).click();
  await p.getByLabel("Login").fill(login);
  await p.getByRole("button", { name: "Sign in" }).click();
}

let first = null;
await runSteps(async () => {
  await step("the sign-in page offers the provider's button next to token sign-in", async () => {
    await page.goto(adminUrl + "/");
    await page.getByRole("heading", { name: "Sign in" }).waitFor();
    await page.getByRole("link", { name: "Sign in with single sign-on" }).waitFor();
    assert.ok(await page.getByLabel("API token").isVisible(), "token sign-in stays for automation and break-glass");
    await page.screenshot({ path: path.join(shots, "oidc-signin.png") });
  });

  await step("a person signs in at the provider and comes back signed in, with a strict session cookie", async () => {
    await signIn(page, "ada");
    await page.getByRole("heading", { name: "Issue a token" }).waitFor();
    assert.match(await page.locator("#who").innerText(), /ada@example\.com/);
    assert.match(await page.locator("#who").innerText(), /your account/);
    const c = (await context.cookies(adminUrl)).find((x) => x.name === "tokengate_session");
    assert.ok(c, "session cookie");
    assert.equal(c.httpOnly, true);
    assert.equal(c.sameSite, "Strict");
    assert.equal((await context.cookies(adminUrl)).some((x) => x.name === "tokengate_oidc"), false, "the binding cookie is gone");
  });

  await step("they issue a token for their own account and it works on the public listener", async () => {
    await page.getByLabel("Name").fill("ada-laptop");
    await page.getByLabel("Role").selectOption("viewer");
    await page.getByRole("button", { name: "Issue token" }).click();
    await page.locator("#reveal").waitFor({ state: "visible" });
    first = await page.getByLabel("Token", { exact: true }).inputValue();
    assert.match(first, /^tg_/);
    const row = page.locator("#tokens tr", { hasText: "ada-laptop" });
    await row.waitFor();
    assert.match(await row.innerText(), /ada@example\.com/);
    const r = await fetch(`${publicUrl}/apps/billing/status`, { headers: { authorization: `Bearer ${first}` } });
    assert.equal(r.status, 200);
    await page.getByRole("button", { name: /hide it/ }).click();
  });

  await step("they cannot exceed their policy: a stronger role is not offered, and refused when asked", async () => {
    const deployer = page.locator("#issue-role option[value=deployer]");
    assert.equal(await deployer.getAttribute("disabled"), "");
    assert.match(await deployer.innerText(), /not allowed/);
    const r = await page.evaluate(async () => {
      const csrf = document.querySelector('meta[name="csrf-token"]').content;
      const resp = await fetch("/v1/tokens", {
        method: "POST",
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
        body: JSON.stringify({ name: "sneaky", role: "deployer" }),
      });
      return { status: resp.status, body: await resp.json() };
    });
    assert.equal(r.status, 403);
    assert.equal(r.body.error, "forbidden");
    const other = await page.evaluate(async () => {
      const csrf = document.querySelector('meta[name="csrf-token"]').content;
      const resp = await fetch("/v1/tokens", {
        method: "POST",
        headers: { "content-type": "application/json", "x-csrf-token": csrf },
        body: JSON.stringify({ name: "elsewhere", role: "viewer", account: "root@example.com" }),
      });
      return resp.status;
    });
    assert.equal(other, 403, "another account's token");
  });

  await step("they issue up to the cap, then are told to revoke one", async () => {
    await page.getByLabel("Name").fill("ada-ci");
    await page.getByRole("button", { name: "Issue token" }).click();
    await page.locator("#reveal").waitFor({ state: "visible" });
    await page.getByRole("button", { name: /hide it/ }).click();
    await page.getByLabel("Name").fill("ada-third");
    await page.getByRole("button", { name: "Issue token" }).click();
    await page.locator("#issue-error").filter({ hasText: /already has 2 active tokens/ }).waitFor();
    await page.screenshot({ path: path.join(shots, "oidc-tokens.png"), fullPage: true });
  });

  await step("their sessions are listed, another browser's can be revoked", async () => {
    const ctx2 = await browser.newContext();
    const p2 = await ctx2.newPage();
    await signIn(p2, "ada");
    await p2.getByRole("heading", { name: "Issue a token" }).waitFor();
    await page.reload();
    await page.getByRole("heading", { name: "Sessions" }).waitFor();
    const rows = page.locator("#sessions-list tr");
    await rows.nth(1).waitFor();
    assert.equal(await rows.count(), 2);
    assert.match(await page.locator("#sessions-list").innerText(), /this browser/);
    await page.screenshot({ path: path.join(shots, "oidc-sessions.png"), fullPage: true });
    const other = page.locator("#sessions-list tr", { hasNotText: "this browser" });
    await other.getByRole("button").click();
    await page.waitForFunction(() => document.querySelectorAll("#sessions-list tr").length === 1);
    assert.equal(await whoamiStatus(p2), 401, "the other browser is signed out");
    await ctx2.close();
  });

  await step("revoking all sessions signs them out everywhere", async () => {
    await signOutWith(page, "Revoke all sessions");
  });

  await step("the audit log tells the story with the person's identity, and no secret", async () => {
    const { text, ev } = await settledAudit(dir);
    const acc = ev("account.created")[0];
    assert.equal(acc.account, "ada@example.com");
    assert.match(acc.target, /^acc_/, "the target is the account id, the name is `account`");
    assert.equal(acc.target, acc.details.account_id);
    const created = ev("session.created");
    assert.equal(created.length, 2);
    for (const c of created) {
      assert.equal(c.auth_type, "session");
      assert.equal(c.actor, "oidc:ada@example.com");
      assert.equal(c.details.sub, "ada");
      assert.equal(c.details.email, "ada@example.com");
    }
    assert.equal(ev("token.created").filter((l) => l.actor === "oidc:ada@example.com").length, 2);
    assert.ok(ev("token.refused").length >= 1, "the stronger token was refused and audited");
    const revoked = ev("session.revoked");
    assert.deepEqual(revoked.map((l) => l.reason).sort(), ["revoked", "signed_out_everywhere"]);
    assert.equal(text.includes(first), false);
    const verify = cli("audit", "verify");
    assert.match(verify, /ok|verified|intact/i);
    assert.deepEqual(consoleErrors.filter((e) => !/401|403|409|Unauthorized|Forbidden|Conflict/.test(e)), []);
  });
}, { dir });
