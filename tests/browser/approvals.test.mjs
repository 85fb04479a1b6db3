// Browser test of the web UI's Approvals page in Debian's headless Chromium (playwright-core).
// It starts a real gateway (`tokengate serve`) with an approval-gated rule in front of a small
// recording upstream, then: a CI token's call is refused (403 approval_required); the CI token
// asks for an approval; a person signs in, enrols TOTP from the QR code's key (computing codes here,
// as an authenticator app would), sees the request with who/what/why, approves it with a code; the
// CI call goes through; the audit log holds the story.
//
// Usage: node approvals.test.mjs   (env: TOKENGATE_BIN, CHROMIUM, SCREENSHOT_DIR)
import path from "node:path";
import assert from "node:assert/strict";
import {
  auditLines, base32, deployRule, gatewayConfig, launchBrowser, mfaAdmin, openPage, prepareGateway,
  runCleanups, shots, startGateway, startUpstream, step, tally, totp,
} from "./harness.mjs";

const { received, url: upstreamUrl } = await startUpstream({ body: () => ({}) });

const { dir, cli, config } = prepareGateway("tokengate-approvals-", gatewayConfig({
  upstream: upstreamUrl,
  admin: mfaAdmin,
  rules: deployRule(`name = "deploy"
approval = { window = "15m", approvers = ["role:admin"] }
`),
}), { mfaKey: true });
cli("store", "init");
cli("account", "create", "platform");
cli("account", "create", "ci-bots");
const person = JSON.parse(cli("token", "create", "--account", "platform", "--name", "alice-console", "--permission", "tokengate:admin", "--expires", "30d", "--json")).token;
const ci = JSON.parse(cli("token", "create", "--account", "ci-bots", "--name", "deploy", "--permission", "apps:deploy", "--expires", "30d", "--json")).token;

const { publicUrl, adminUrl } = await startGateway(config);

const deploy = () => fetch(`${publicUrl}/apps/billing/deploy`, { method: "POST", headers: { authorization: `Bearer ${ci}` } });

const browser = await launchBrowser();
const { page, consoleErrors } = await openPage(browser, { viewport: { width: 1280, height: 900 } });

try {
  let id;
  await step("a CI call to the gated rule is refused and nothing is forwarded", async () => {
    const r = await deploy();
    assert.equal(r.status, 403);
    assert.equal((await r.json()).error, "approval_required");
    assert.equal(received.length, 0);
  });

  await step("the CI token asks for an approval", async () => {
    const r = await fetch(`${adminUrl}/v1/approvals`, {
      method: "POST",
      headers: { authorization: `Bearer ${ci}`, "content-type": "application/json" },
      body: JSON.stringify({ rule: "deploy", params: { app: "billing" }, message: "release 4.2" }),
    });
    assert.equal(r.status, 201);
    id = (await r.json()).id;
  });

  let secret;
  await step("a person signs in and enrols TOTP from the QR code's key", async () => {
    await page.goto(adminUrl + "/");
    await page.getByLabel("API token").fill(person);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("link", { name: "Approvals" }).click();
    await page.getByRole("heading", { name: "Approvals", level: 1 }).waitFor();
    await page.getByRole("button", { name: "Set up an authenticator app" }).click();
    await page.getByRole("img", { name: "QR code of the authenticator key" }).waitFor();
    assert.equal(await page.locator("#mfa-recovery").evaluate((e) => e.textContent.split("\n").length), 10);
    secret = base32(await page.locator("#mfa-secret").inputValue());
    await page.screenshot({ path: path.join(shots, "mfa-enrol.png") });
    await page.getByLabel("Code from the app").fill(totp(secret));
    await page.getByRole("button", { name: "Confirm" }).click();
    await page.getByText("Two-factor authentication is set up.").waitFor();
  });

  await step("the pending request shows who, what and why; the person approves with a code", async () => {
    const row = page.locator("#approvals-rows tr", { hasText: "deploy" });
    await row.waitFor();
    const text = await row.textContent();
    assert.match(text, /app=billing/);
    assert.match(text, /ci-bots/);
    assert.match(text, /release 4\.2/);
    await page.screenshot({ path: path.join(shots, "approvals.png") });
    // The confirmation used this step's code: the next step's (accepted within the drift window).
    await page.getByLabel(`TOTP code for ${id}`).fill(totp(secret, 1));
    await page.getByLabel(`Note for ${id}`).fill("go ahead");
    await row.getByRole("button", { name: "Approve" }).click();
    await page.getByText("Approved deploy.").waitFor();
  });

  await step("the CI call goes through, and the audit log holds the story", async () => {
    const r = await deploy();
    assert.equal(r.status, 200);
    assert.equal(received.length, 1);
    const events = auditLines(dir).filter((l) => l.kind === "admin").map((l) => l.event);
    for (const e of ["approval.requested", "mfa.enrolled", "approval.approved", "approval.used"]) {
      assert.ok(events.includes(e), `${e} in ${events}`);
    }
    cli("audit", "verify");
  });

  await step("no console errors", async () => {
    assert.deepEqual(consoleErrors, []);
  });
} finally {
  await runCleanups();
}
if (tally.failed) process.exit(1);
console.log("approvals browser test passed");
