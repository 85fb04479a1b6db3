// Browser test of the tokengate web UI in Debian's headless Chromium (playwright-core, no
// downloaded browser). It starts a real gateway (`tokengate serve`) with a temp SQLite store and
// audit log in front of a small recording upstream, then, as a person would: signs in with a
// token, issues a token in the issue card, reads it from the one-time reveal box, calls the public
// listener with it (200), revokes it in the table (with the confirmation dialog), and sees the next
// call get 401; and, signed in, visits the public listener on the same host (another port) to see
// the upstream never receive the session cookie the browser sends along. It also checks the
// table's search and filters (account, status, expiring and stale views), the "this is you" marker
// and the stronger confirmation before revoking yourself, the readable cap error, issuing with a
// custom-permission sign-in, and the layout at 375 px (no sideways scrolling, Revoke on screen).
// Screenshots go to $SCREENSHOT_DIR (docs/screenshots and docs/img hold the checked-in ones,
// ui-1280.png and ui-375.png among them).
//
// Usage: node ui.test.mjs   (env: TOKENGATE_BIN, CHROMIUM, SCREENSHOT_DIR)
import path from "node:path";
import assert from "node:assert/strict";
import {
  appsReadRule, auditText, gatewayConfig, launchBrowser, openPage, prepareGateway, runSteps, settledAudit,
  shots, signOutWith, startGateway, startUpstream, step,
} from "./harness.mjs";

// ------------------------------------------------------------------ recording upstream
const { received, url: upstreamUrl } = await startUpstream({ body: (req) => ({ upstream: "ok", path: req.url }) });

// ------------------------------------------------------------------ gateway
const { dir, cli, config } = prepareGateway("tokengate-ui-", gatewayConfig({
  upstream: upstreamUrl,
  sections: "[tokens]\nmax_active_per_account = 3\n",
  rules: appsReadRule + `
[[routes.rules]]
methods = ["GET"]
path = "/public/**"
public = true
`,
}));
cli("store", "init"); // no other command creates the store
cli("account", "create", "platform", "--email", "platform@example.com");
cli("account", "create", "ci-bots");
const signin = JSON.parse(cli("token", "create", "--account", "platform", "--name", "alice-console", "--permission", "tokengate:admin", "--permission", "apps:read", "--expires", "30d", "--json"));
const signinToken = signin.token;
// A second token so the table has some company in the screenshots.
cli("token", "create", "--account", "ci-bots", "--name", "nightly-build", "--role", "cicd", "--expires", "90d");
cli("token", "create", "--account", "ci-bots", "--name", "release-soon", "--role", "viewer", "--expires", "7d");
// A person whose token has custom permissions (no role it may grant).
cli("account", "create", "dana");
const custom = JSON.parse(cli("token", "create", "--account", "dana", "--name", "dana-laptop", "--permission", "tokengate:self", "--permission", "apps:read", "--expires", "30d", "--json"));

const { publicUrl, adminUrl } = await startGateway(config);

async function callPublic(token) {
  const r = await fetch(`${publicUrl}/apps/billing/status`, { headers: { authorization: `Bearer ${token}` } });
  return { status: r.status, challenge: r.headers.get("www-authenticate") || "" };
}

// ------------------------------------------------------------------ the browser
const browser = await launchBrowser();
const { context, page, consoleErrors } = await openPage(browser, { viewport: { width: 1280, height: 800 }, deviceScaleFactor: 1 });
await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: adminUrl });

let issued = null;
await runSteps(async () => {
  await step("the page asks for a token to sign in", async () => {
    await page.goto(adminUrl + "/");
    await page.getByRole("heading", { name: "Sign in" }).waitFor();
    const input = page.getByLabel("API token");
    assert.equal(await input.getAttribute("type"), "password");
    assert.equal(await page.evaluate(() => document.activeElement.id), "signin-token", "focus starts in the token field");
    await page.screenshot({ path: path.join(shots, "signin.png") });
  });

  await step("a wrong token is refused with a message", async () => {
    await page.getByLabel("API token").fill("tg_notarealtoken");
    await page.keyboard.press("Enter");
    await page.locator("#signin-error").filter({ hasText: /not valid/ }).waitFor();
  });

  await step("signing in with the keyboard sets a strict HttpOnly session cookie", async () => {
    await page.getByLabel("API token").fill(signinToken);
    await page.keyboard.press("Enter");
    await page.getByRole("heading", { name: "Issue a token" }).waitFor();
    await page.locator("#tokens tr").first().waitFor();
    const cookies = await context.cookies(adminUrl);
    const c = cookies.find((x) => x.name === "tokengate_session");
    assert.ok(c, "session cookie");
    assert.equal(c.httpOnly, true);
    assert.equal(c.sameSite, "Strict");
    assert.equal(c.value.length, 64);
    assert.equal(await page.evaluate(() => document.cookie), "", "scripts cannot read the cookie");
    const csrf = await page.locator('meta[name="csrf-token"]').getAttribute("content");
    assert.match(csrf, /^[0-9a-f]{64}$/);
    assert.match(await page.locator("#who").innerText(), /alice-console/);
  });

  await step("the session cookie the browser sends to the public listener never reaches the upstream", async () => {
    // Same host (127.0.0.1), other port: browsers scope cookies by host, not port, so the admin
    // session cookie goes along with the site's own cookies.
    await context.addCookies([{ name: "theme", value: "dark", url: publicUrl }]);
    const other = await context.newPage();
    let sent = "";
    other.on("request", async (r) => { sent = (await r.allHeaders()).cookie || sent; });
    const before = received.length;
    const resp = await other.goto(publicUrl + "/public/page");
    assert.equal(resp.status(), 200);
    const session = (await context.cookies(adminUrl)).find((x) => x.name === "tokengate_session");
    assert.ok(sent.includes(`tokengate_session=${session.value}`), `the browser sent it: ${sent}`);
    const upCalls = received.slice(before);
    assert.equal(upCalls.length, 1);
    assert.equal(upCalls[0].url, "/public/page");
    assert.equal(upCalls[0].headers.cookie, "theme=dark");
    assert.equal(JSON.stringify(upCalls[0].headers).includes(session.value), false);
    // A fetch from the public page, with credentials, too.
    const status = await other.evaluate(async () => (await fetch("/public/fetch", { credentials: "include" })).status);
    assert.equal(status, 200);
    assert.equal(received.at(-1).url, "/public/fetch");
    assert.equal(received.at(-1).headers.cookie, "theme=dark");
    await other.close();
  });

  await step("the signed-in token's row says so", async () => {
    const mine = page.locator("#tokens tr", { hasText: "alice-console" });
    assert.match(await mine.innerText(), /this is you/);
    assert.equal(await page.locator("#tokens .you").count(), 1, "only one row is you");
  });

  await step("search and filters: account, name, prefix, expiring and stale views", async () => {
    const names = async () => (await page.locator("#tokens tr th").allInnerTexts()).map((t) => t.replace(/\s*this is you/, ""));
    assert.deepEqual((await names()).sort(), ["alice-console", "dana-laptop", "nightly-build", "release-soon"]);
    await page.getByLabel("Search").fill("nightly");
    assert.deepEqual(await names(), ["nightly-build"]);
    await page.getByLabel("Search").fill(signin.prefix);
    assert.deepEqual(await names(), ["alice-console"], "by prefix");
    await page.getByLabel("Search").fill("");
    await page.locator("#filter-account").selectOption("ci-bots");
    assert.deepEqual((await names()).sort(), ["nightly-build", "release-soon"]);
    await page.locator("#filter-view").selectOption("expiring");
    assert.deepEqual(await names(), ["release-soon"]);
    assert.equal(await page.locator("#tokens-h").innerText(), "Expiring tokens");
    assert.match(await page.locator("#tokens tr").first().innerText(), /expiring/);
    await page.locator("#filter-view").selectOption("stale");
    assert.deepEqual(await names(), []);
    assert.match(await page.locator("#tokens-empty").innerText(), /No token matches/);
    await page.locator("#filter-view").selectOption("active");
    await page.locator("#filter-account").selectOption("");
    assert.equal((await names()).length, 4);
  });

  await step("the page at 1280 px", async () => {
    await page.screenshot({ path: path.join(shots, "ui-1280.png"), fullPage: true });
  });

  await step("every form control has a label", async () => {
    const unlabeled = await page.evaluate(() =>
      [...document.querySelectorAll("input, select")]
        .filter((el) => !el.closest("[hidden]"))
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label"))
        .map((el) => el.id));
    assert.deepEqual(unlabeled, []);
    assert.ok(await page.locator("#reveal [aria-live]").count() >= 1, "the reveal box announces itself");
    await page.screenshot({ path: path.join(shots, "tokens.png"), fullPage: true });
  });

  await step("issue a token from the issue card, by keyboard", async () => {
    await page.getByLabel("Name").focus();
    await page.keyboard.type("deploy-from-browser");
    await page.keyboard.press("Tab");
    assert.equal(await page.evaluate(() => document.activeElement.id), "issue-account", "focus order: name, account, role, expiry");
    await page.getByLabel("Account").selectOption("ci-bots");
    await page.getByLabel("Role").selectOption("viewer");
    await page.getByLabel("Expires").selectOption("30d");
    await page.getByRole("button", { name: "Issue token" }).click();
    await page.locator("#reveal").waitFor({ state: "visible" });
    issued = await page.getByLabel("Token", { exact: true }).inputValue();
    assert.match(issued, /^tg_[0-9A-Za-z]{38}$/);
    assert.equal(await page.getByLabel("Shell").inputValue(), `export TOKENGATE_TOKEN=${issued}`);
    assert.equal(await page.evaluate(() => document.activeElement.id), "reveal-token", "focus moves to the new token");
    assert.match(await page.locator("#reveal-live").innerText(), /shown only once/);
    const row = page.locator("#tokens tr", { hasText: "deploy-from-browser" });
    await row.waitFor();
    assert.match(await row.innerText(), /ci-bots/);
    assert.match(await row.innerText(), /viewer/);
    assert.match(await row.innerText(), new RegExp(issued.slice(0, 11)));
  });

  await step("the token cap is told in words, not API text", async () => {
    await page.getByRole("button", { name: /hide it/ }).click();
    await page.getByLabel("Name").fill("one-too-many");
    await page.locator("#issue-account").selectOption("ci-bots");
    await page.getByRole("button", { name: "Issue token" }).click();
    const err = page.locator("#issue-error");
    await err.filter({ hasText: /active tokens/ }).waitFor();
    const text = await err.innerText();
    assert.match(text, /already has 3 active tokens, the most it may have\. Revoke one/);
    assert.doesNotMatch(text, /tokengate token revoke|token_limit|`/, text);
    assert.equal(await page.locator("#reveal").isVisible(), false);
    // Show the issued token again for the copy steps below.
    await page.evaluate((t) => {
      document.getElementById("reveal-token").value = t;
      document.getElementById("reveal-export").value = "export TOKENGATE_TOKEN=" + t;
      document.getElementById("reveal").hidden = false;
      document.getElementById("issue-error").textContent = "";
    }, issued);
    await page.getByLabel("Name").fill("");
  });

  await step("the copy buttons copy the raw token and the export line", async () => {
    await page.getByRole("button", { name: "Copy token" }).click();
    await page.locator("#copy-status").filter({ hasText: "Token copied" }).waitFor();
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), issued);
    await page.getByRole("button", { name: "Copy export line" }).click();
    await page.locator("#copy-status").filter({ hasText: "Export line copied" }).waitFor();
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), `export TOKENGATE_TOKEN=${issued}`);
    // The screenshot shows the box with the secret part masked: a real token never goes in docs/.
    const masked = issued.slice(0, 11) + "•".repeat(30);
    await page.evaluate((m) => {
      document.getElementById("reveal-token").value = m;
      document.getElementById("reveal-export").value = "export TOKENGATE_TOKEN=" + m;
    }, masked);
    await page.screenshot({ path: path.join(shots, "issued.png"), fullPage: true });
    await page.evaluate((t) => {
      document.getElementById("reveal-token").value = t;
      document.getElementById("reveal-export").value = "export TOKENGATE_TOKEN=" + t;
    }, issued);
  });

  await step("the issued token works on the public listener", async () => {
    const before = received.length;
    const r = await callPublic(issued);
    assert.equal(r.status, 200);
    assert.equal(received.length, before + 1);
    assert.equal(received.at(-1).url, "/apps/billing/status");
    assert.equal(received.at(-1).headers["x-tokengate-token-name"], "deploy-from-browser");
  });

  await step("hiding the reveal box forgets the token", async () => {
    await page.getByRole("button", { name: /hide it/ }).click();
    assert.equal(await page.locator("#reveal").isVisible(), false);
    assert.equal(await page.evaluate(() => document.getElementById("reveal-token").value), "");
    assert.equal(await page.evaluate((t) => document.body.innerHTML.includes(t), issued), false);
  });

  await step("revoke it in the table, after confirming", async () => {
    const row = page.locator("#tokens tr", { hasText: "deploy-from-browser" });
    await row.getByRole("button", { name: /Revoke deploy-from-browser/ }).click();
    const dialog = page.getByRole("dialog", { name: "Revoke this token?" });
    await dialog.waitFor();
    assert.match(await dialog.innerText(), /deploy-from-browser/);
    await page.screenshot({ path: path.join(shots, "revoke-confirm.png") });
    // Cancel first: nothing happens.
    await dialog.getByRole("button", { name: "Cancel" }).click();
    assert.equal((await callPublic(issued)).status, 200);
    await row.getByRole("button", { name: /Revoke deploy-from-browser/ }).click();
    await dialog.getByRole("button", { name: "Revoke" }).click();
    await row.waitFor({ state: "detached" });
  });

  await step("the next call with the revoked token gets 401 and reaches nothing", async () => {
    const before = received.length;
    const r = await callPublic(issued);
    assert.equal(r.status, 401);
    assert.match(r.challenge, /error="invalid_token"/);
    assert.match(r.challenge, /revoked/);
    assert.equal(received.length, before, "the upstream received nothing");
  });

  await step("revoking yourself names the consequence first", async () => {
    const mine = page.locator("#tokens tr", { hasText: "alice-console" });
    await mine.getByRole("button", { name: /Revoke alice-console/ }).click();
    const dialog = page.getByRole("dialog", { name: "Revoke the token you are signed in with?" });
    await dialog.waitFor();
    assert.match(await dialog.innerText(), /signs you out of this page at once/);
    assert.match(await dialog.innerText(), /stops working/);
    await dialog.getByRole("button", { name: "Cancel" }).click();
    assert.equal((await callPublic(signinToken)).status, 200, "cancel keeps it");
  });

  await step("a custom-permission sign-in can issue a token with its own permissions", async () => {
    const ctx2 = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const p2 = await ctx2.newPage();
    await p2.goto(adminUrl + "/");
    await p2.getByLabel("API token").fill(custom.token);
    await p2.keyboard.press("Enter");
    await p2.getByRole("heading", { name: "Issue a token" }).waitFor();
    const role = p2.getByLabel("Role");
    assert.match(await role.locator("option:checked").innerText(), /Same permissions as your sign-in \(apps:read\)/);
    await p2.getByLabel("Name").fill("dana-script");
    await p2.getByRole("button", { name: "Issue token" }).click();
    await p2.locator("#reveal").waitFor({ state: "visible", timeout: 5000 }).catch(async (e) => {
      throw new Error("no reveal box; error shown: " + (await p2.locator("#issue-error").innerText()));
    });
    assert.equal(await p2.locator("#issue-error").innerText(), "");
    const t = await p2.getByLabel("Token", { exact: true }).inputValue();
    assert.equal((await callPublic(t)).status, 200, "the new token works");
    const row = p2.locator("#tokens tr", { hasText: "dana-script" });
    assert.match(await row.innerText(), /custom/);
    await ctx2.close();
  });

  await step("at 375 px wide: no sideways scrolling, Revoke on screen", async () => {
    const phone = await browser.newContext({ viewport: { width: 375, height: 740 }, deviceScaleFactor: 1 });
    const p3 = await phone.newPage();
    await p3.goto(adminUrl + "/");
    await p3.getByLabel("API token").fill(signinToken);
    await p3.keyboard.press("Enter");
    await p3.locator("#tokens tr").first().waitFor();
    assert.ok(await p3.evaluate(() => document.documentElement.scrollWidth) <= 375, "no horizontal scroll");
    for (const b of await p3.locator("#tokens button").all()) {
      const box = await b.boundingBox();
      assert.ok(box && box.x >= 0 && box.x + box.width <= 375, `Revoke button on screen: ${JSON.stringify(box)}`);
    }
    await p3.screenshot({ path: path.join(shots, "ui-375.png"), fullPage: true });
    await phone.close();
  });

  await step("sign out ends the session", async () => {
    await signOutWith(page, "Sign out");
  });

  await step("the audit log has the session's actions, and no token", async () => {
    const { ev } = await settledAudit(dir);
    for (const name of ["session.login", "token.created", "token.revoked", "session.logout"]) {
      const found = ev(name).filter((l) => l.auth_type === "session" && l.actor === signin.id);
      // Signed in on the desktop page and again at phone width; one of everything else.
      if (name === "session.login") assert.ok(found.length >= 1, name);
      else assert.equal(found.length, 1, name);
      assert.equal(found[0].actor, signin.id, name);
    }
    const text = auditText(dir);
    assert.equal(text.includes(issued), false);
    assert.equal(text.includes(signinToken), false);
    // 401 after sign-out, 409 of the cap step: expected answers the page handles.
    assert.deepEqual(consoleErrors.filter((e) => !/401|Unauthorized|409 \(Conflict\)/.test(e)), []);
  });
}, { dir });
