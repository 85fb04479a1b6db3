// The whole story of issue 19 end to end, in Debian's headless Chromium (playwright-core), against
// a real OpenID provider (the certified oidc-provider package, tests/oidc/provider.mjs) and a real
// gateway (`tokengate serve`) in front of a recording upstream:
//
//   1. a person (ada, not an admin) clicks "Sign in with single sign-on" and types their login at
//      the provider;
//   2. enrols TOTP on the Approvals page (the key read from the page, codes computed here as an
//      authenticator app would);
//   3. issues a token for their own account, which works within their policy; a stronger role and a
//      token over the per-account cap are refused, and the page shows why;
//   4. a CI token's call to the approval-gated rule is 403 approval_required, nothing forwarded;
//   5. `tokengate approval request --rule deploy --wait 2m` runs as a child process (its token in
//      TOKENGATE_TOKEN, never on argv) and blocks: it is still running, and polling, before anyone
//      approves;
//   6. the person approves on the Approvals page with a TOTP code; the command exits 0;
//   7. the CI call goes through (the upstream records it, with the same request id);
//   8. once the approval window has passed, the call is 403 approval_required again;
//   9. the audit log holds the whole story in order, and `tokengate audit verify` exits 0.
//
// The approval window is a short real one (WINDOW below): the gateway binary has no fake-clock knob
// (its clock offset exists only inside the Rust tests, and a production binary must not let anyone
// move its clock), so step 8 waits for the real window to pass. It is long enough to cover the
// command's polling backoff (1 s, 2 s, 4 s, 8 s, 15 s) between the approval and the allowed call,
// even on a slow machine, and the test waits only for what is left of it.
//
// Usage: node story.test.mjs   (env: TOKENGATE_BIN, CHROMIUM, SCREENSHOT_DIR)
import { spawn } from "node:child_process";
import os from "node:os";
import path from "node:path";
import assert from "node:assert/strict";
import {
  adminEvents, appsReadRule, auditLines, base32, bin, deployRule, gatewayConfig, hotp, launchBrowser, mfaAdmin,
  oidcAdmin, onCleanup, openPage, prepareGateway, runSteps, settledAudit, shots, sleep, startGateway, startProvider,
  startUpstream, step, timeStep, totp,
} from "./harness.mjs";

const WINDOW_SECONDS = 30;

// ------------------------------------------------------------------ an authenticator app
// The gateway refuses a step already used, so each code is for a step after the last one used
// (the current step, or the next one: ±1 is accepted).
let lastStep = -1;
function nextCode(key) {
  const now = timeStep();
  const s = Math.max(now, lastStep + 1);
  assert.ok(s <= now + 1, "a fresh step is within the accepted drift");
  lastStep = s;
  return hotp(key, s);
}

// ------------------------------------------------------------------ the OpenID provider
const issuer = await startProvider();

// ------------------------------------------------------------------ recording upstream
const { received, url: upstreamUrl } = await startUpstream({
  record: (req) => ({ method: req.method, url: req.url, requestId: req.headers["x-request-id"], authorization: req.headers.authorization }),
  body: (req) => ({ upstream: "ok", url: req.url }),
});

// ------------------------------------------------------------------ gateway
const { dir, cli, config } = prepareGateway("tokengate-story-", gatewayConfig({
  upstream: upstreamUrl,
  admin: oidcAdmin(issuer) + "\n" + mfaAdmin,
  sections: "[tokens]\nmax_active_per_account = 1\n",
  rules: appsReadRule + deployRule(`name = "deploy"
approval = { window = "${WINDOW_SECONDS}s", approvers = ["account:ada@example.com"] }
`),
}), { clientSecret: true, mfaKey: true });
cli("store", "init");
cli("account", "create", "ci-bots");
// The CI token, as an operator bootstraps it; the plaintext stays in this process's memory.
const ciCreated = JSON.parse(cli("token", "create", "--account", "ci-bots", "--name", "deploy-billing", "--role", "cicd", "--expires", "30d", "--json"));
const ci = ciCreated.token;
assert.match(ci, /^tg_/);

const { publicUrl, adminUrl } = await startGateway(config);

const deploy = () => fetch(`${publicUrl}/apps/billing/deploy`, { method: "POST", headers: { authorization: `Bearer ${ci}` } });
// The CI call, refused at the gate: 403 approval_required for rule `deploy`, naming `approvalId`
// (null: no pending request), nothing forwarded; its request id joins `refusals`.
async function gatedRefusal(approvalId, why) {
  const before = received.length;
  const r = await deploy();
  assert.equal(r.status, 403);
  const body = await r.json();
  assert.equal(body.error, "approval_required");
  assert.equal(body.rule, "deploy");
  assert.equal(body.approval_id, approvalId, why);
  refusals.push(r.headers.get("x-request-id"));
  assert.equal(received.length, before, "upstream received nothing");
}

// ------------------------------------------------------------------ the browser
const browser = await launchBrowser();
const { context, page, consoleErrors } = await openPage(browser, { viewport: { width: 1280, height: 900 } });

// Fills the "Issue a token" form with `name` and `role` and submits it; returns the API's answer.
async function issueInPage(name, role) {
  await page.getByLabel("Name").fill(name);
  await page.getByLabel("Role").selectOption(role);
  const answer = page.waitForResponse((r) => r.url() === `${adminUrl}/v1/tokens` && r.request().method() === "POST");
  await page.getByRole("button", { name: "Issue token" }).click();
  return answer;
}

let key = null;          // the TOTP key, as the authenticator app holds it
let personal = null;     // the token ada issued for herself
let approvalId = null;
let waiter = null;       // the `tokengate approval request --wait` child
const waiterOut = { stdout: "", stderr: "", code: undefined };
const refusals = [];     // request ids of the gated 403s
let allowedRequestId = null;
let approvedAt = null;

await runSteps(async () => {
  // ---------------------------------------------------------------- 1. sign in at the provider
  await step("1. a person signs in through the provider: single sign-on button, their login typed at the provider", async () => {
    await page.goto(adminUrl + "/");
    await page.getByRole("link", { name: "Sign in with single sign-on" }).click();
    await page.waitForURL((u) => u.origin === issuer && u.pathname.startsWith("/interaction/"));
    await page.getByLabel("Login").fill("ada");
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("heading", { name: "Issue a token" }).waitFor();
    assert.equal(new URL(page.url()).origin, adminUrl, "back on the gateway's web UI");
    assert.match(await page.locator("#who").innerText(), /ada@example\.com/);
    assert.match(await page.locator("#who").innerText(), /your account/, "not an admin: own-account access");
    const cookies = await context.cookies(adminUrl);
    const session = cookies.find((c) => c.name === "tokengate_session");
    assert.ok(session, "a session cookie");
    assert.equal(session.httpOnly, true);
    assert.equal(session.sameSite, "Strict");
    const me = await page.evaluate(async () => (await fetch("/v1/whoami")).json());
    assert.equal(me.auth_type, "session");
    assert.equal(me.account, "ada@example.com");
    assert.equal(me.access, "self");
  });

  // ---------------------------------------------------------------- 2. TOTP enrolment
  await step("2. they enrol TOTP: the key is read from the page, the first code is computed here", async () => {
    await page.getByRole("link", { name: "Approvals" }).click();
    await page.getByRole("heading", { name: "Approvals", level: 1 }).waitFor();
    await page.locator("#mfa-state").filter({ hasText: "Not set up" }).waitFor();
    await page.getByRole("button", { name: "Set up an authenticator app" }).click();
    await page.getByRole("img", { name: "QR code of the authenticator key" }).waitFor();
    const keyText = await page.getByLabel("Key", { exact: true }).inputValue();
    assert.match(keyText, /^[A-Z2-7]{16,}=*$/, "a base32 key");
    key = base32(keyText);
    assert.ok(key.length >= 16, "at least 128 bits");
    const recovery = (await page.locator("#mfa-recovery").textContent()).split("\n");
    assert.equal(recovery.length, 10, "ten recovery codes");
    assert.equal(new Set(recovery).size, 10);
    await page.screenshot({ path: path.join(shots, "story-mfa-enrol.png") });
    // A wrong code is refused and the page says so; the enrolment waits for a right one.
    const wrong = totp(key, 5);
    await page.getByLabel("Code from the app").fill(wrong);
    await page.getByRole("button", { name: "Confirm" }).click();
    await page.locator("#mfa-error").filter({ hasText: "Wrong or already used code" }).waitFor();
    assert.equal(await page.getByRole("img", { name: "QR code of the authenticator key" }).isVisible(), true, "the enrolment waits");
    await page.getByLabel("Code from the app").fill(nextCode(key));
    await page.getByRole("button", { name: "Confirm" }).click();
    await page.getByText("Two-factor authentication is set up.").waitFor();
    await page.locator("#mfa-state").filter({ hasText: "Set up. 10 recovery codes left." }).waitFor();
    const m = await page.evaluate(async () => (await fetch("/v1/mfa")).json());
    assert.equal(m.enrolled, true);
  });

  // ---------------------------------------------------------------- 3. own token, within policy
  await step("3a. they issue a token for their own account in the UI; it works within their policy", async () => {
    await page.getByRole("link", { name: "Back to API tokens" }).click();
    await page.getByRole("heading", { name: "Issue a token" }).waitFor();
    assert.equal((await issueInPage("ada-laptop", "viewer")).status(), 201);
    await page.locator("#reveal").waitFor({ state: "visible" });
    personal = await page.getByLabel("Token", { exact: true }).inputValue();
    assert.match(personal, /^tg_/);
    const row = page.locator("#tokens tr", { hasText: "ada-laptop" });
    await row.waitFor();
    const rowText = await row.innerText();
    assert.match(rowText, /ada@example\.com/);
    assert.match(rowText, /viewer/);
    await page.getByRole("button", { name: /hide it/ }).click();
    const read = await fetch(`${publicUrl}/apps/billing/status`, { headers: { authorization: `Bearer ${personal}` } });
    assert.equal(read.status, 200);
    assert.deepEqual(await read.json(), { upstream: "ok", url: "/apps/billing/status" });
    assert.deepEqual(received.map((r) => `${r.method} ${r.url}`), ["GET /apps/billing/status"]);
    assert.equal(received[0].authorization, undefined, "the token is not forwarded upstream");
    // A viewer cannot deploy: refused by the role, before any approval comes into it.
    const d = await fetch(`${publicUrl}/apps/billing/deploy`, { method: "POST", headers: { authorization: `Bearer ${personal}` } });
    assert.equal(d.status, 403);
    const body = await d.json();
    assert.equal(body.error, "insufficient_scope");
    assert.equal(body.required_permission, "apps:deploy");
    assert.equal(received.length, 1, "nothing more forwarded");
  });

  await step("3b. a stronger role is not offered, and refused with the reason shown when the page is tampered with", async () => {
    const deployer = page.locator("#issue-role option[value=deployer]");
    assert.equal(await deployer.getAttribute("disabled"), "");
    assert.match(await deployer.innerText(), /not allowed for this sign-in/);
    // What someone editing the page would do: re-enable the option and submit it.
    await page.evaluate(() => document.querySelector("#issue-role option[value=deployer]").removeAttribute("disabled"));
    const r = await issueInPage("ada-deployer", "deployer");
    assert.equal(r.status(), 403);
    const body = await r.json();
    assert.equal(body.error, "forbidden");
    await page.locator("#issue-error").filter({ hasText: /Your sign-in is not allowed to do this/ }).waitFor();
    assert.equal(await page.locator("#reveal").isVisible(), false, "no token revealed");
    assert.equal(await page.locator("#tokens tr", { hasText: "ada-deployer" }).count(), 0);
  });

  await step("3c. over the per-account cap (1) is refused, and the page says to revoke one", async () => {
    await page.reload();
    await page.getByRole("heading", { name: "Issue a token" }).waitFor();
    await page.locator("#tokens tr", { hasText: "ada-laptop" }).waitFor();
    const r = await issueInPage("ada-second", "viewer");
    assert.equal(r.status(), 409);
    assert.equal((await r.json()).error, "token_limit");
    await page.locator("#issue-error").filter({ hasText: /already has 1 active tokens, the most it may have\. Revoke one/ }).waitFor();
    assert.equal(await page.locator("#reveal").isVisible(), false);
    assert.equal(await page.locator("#tokens tr", { hasText: "ada-second" }).count(), 0);
    await page.screenshot({ path: path.join(shots, "story-tokens.png"), fullPage: true });
  });

  // ---------------------------------------------------------------- 4. the gate
  await step("4. the CI token's call to the approval-gated rule is 403 approval_required; nothing reaches the upstream", async () => {
    await gatedRefusal(null, "nothing asked yet");
    assert.ok(refusals[0], "the refusal carries a request id");
  });

  // ---------------------------------------------------------------- 5. the waiting command
  await step("5. `tokengate approval request --wait` (token in TOKENGATE_TOKEN, not argv) asks and blocks", async () => {
    const args = ["--url", adminUrl, "approval", "request", "--rule", "deploy", "--param", "app=billing",
      "--message", "release 4.2", "--wait", "2m"];
    assert.ok(!args.some((a) => a.includes(ci)), "the token is not on the command line");
    const env = { ...process.env, TOKENGATE_TOKEN: ci, HOME: dir, XDG_CONFIG_HOME: path.join(dir, "xdg") };
    for (const k of ["TOKENGATE_URL", "TOKENGATE_PROFILE", "TOKENGATE_CONFIG"]) delete env[k];
    waiter = spawn(bin, args, { env, cwd: os.tmpdir(), stdio: ["ignore", "pipe", "pipe"] });
    onCleanup(() => { if (waiterOut.code === undefined) waiter.kill("SIGTERM"); });
    waiter.stdout.on("data", (d) => { waiterOut.stdout += d; });
    waiter.stderr.on("data", (d) => { waiterOut.stderr += d; });
    waiter.on("exit", (c) => { waiterOut.code = c; });
    // It has asked: the request is pending.
    const deadline = Date.now() + 20000;
    while (!/approval \S+ for rule `deploy`: pending/.test(waiterOut.stderr)) {
      assert.equal(waiterOut.code, undefined, `exited early: ${waiterOut.stderr}`);
      assert.ok(Date.now() < deadline, `no request made: ${waiterOut.stderr}`);
      await sleep(100);
    }
    approvalId = waiterOut.stderr.match(/approval (\S+) for rule/)[1];
    assert.match(approvalId, /^apr_/);
    // The gated call now names the pending request, and is still refused.
    await gatedRefusal(approvalId, "the refusal names the pending request");
    // It blocks: after its first poll (1 s) it is still running, with nothing on stdout yet.
    const polls = () => auditLines(dir).filter((l) => l.kind === "request" && l.method === "GET" && l.path === `/v1/approvals/${approvalId}`).length;
    while (polls() < 1) {
      assert.ok(Date.now() < deadline, "the command polls the request");
      await sleep(100);
    }
    assert.equal(waiterOut.code, undefined, "still running before the approval");
    assert.equal(waiter.exitCode, null);
    assert.equal(waiterOut.stdout, "");
    assert.equal(received.filter((x) => x.method === "POST").length, 0, "no deploy forwarded");
  });

  // ---------------------------------------------------------------- 6. approval in the UI
  await step("6. the person sees who/what/why and approves with a TOTP code; the waiting command exits 0", async () => {
    await page.getByRole("link", { name: "Approvals" }).click();
    await page.getByRole("heading", { name: "Approvals", level: 1 }).waitFor();
    const row = page.locator("#approvals-rows tr", { hasText: "release 4.2" });
    await row.waitFor();
    const text = await row.innerText();
    assert.match(text, /deploy/);
    assert.match(text, /app=billing/);
    assert.match(text, new RegExp(`ci-bots \\(${ciCreated.prefix}\\)`));
    assert.match(text, /pending/);
    await page.screenshot({ path: path.join(shots, "story-approvals.png") });
    // A wrong code is refused; the request stays pending and the command keeps waiting.
    await page.getByLabel(`TOTP code for ${approvalId}`).fill(totp(key, 7));
    await row.getByRole("button", { name: "Approve" }).click();
    await page.locator("#approvals-error").filter({ hasText: "Wrong or already used code" }).waitFor();
    assert.match(await row.innerText(), /pending/, "still pending");
    assert.equal(waiterOut.code, undefined, "still waiting after a wrong code");
    assert.equal(waiter.exitCode, null);
    await page.getByLabel(`TOTP code for ${approvalId}`).fill(nextCode(key));
    await page.getByLabel(`Note for ${approvalId}`).fill("go ahead");
    assert.equal(waiterOut.code, undefined, "still running right before the approval");
    const answer = page.waitForResponse((r) => r.url().endsWith(`/v1/approvals/${approvalId}/approve`));
    await row.getByRole("button", { name: "Approve" }).click();
    const a = await answer;
    assert.equal(a.status(), 200);
    const approved = await a.json();
    assert.equal(approved.status, "approved");
    assert.equal(approved.decided_by, "ada@example.com (oidc:ada@example.com)");
    approvedAt = Date.parse(approved.decided_at);
    assert.equal(Date.parse(approved.expires_at) - approvedAt, WINDOW_SECONDS * 1000);
    await page.getByText("Approved deploy.").waitFor();
    // The command notices at its next poll (backoff at most 15 s) and exits 0.
    const deadline = Date.now() + 30000;
    while (waiterOut.code === undefined) {
      assert.ok(Date.now() < deadline, `the command did not exit: ${waiterOut.stderr}`);
      await sleep(100);
    }
    assert.equal(waiterOut.code, 0, waiterOut.stderr);
    assert.equal(waiterOut.stdout.trim(), approvalId);
    assert.match(waiterOut.stderr, /approved by ada@example\.com \(oidc:ada@example\.com\) until /);
    assert.equal(waiterOut.stderr.includes(ci), false, "the token is never printed");
  });

  // ---------------------------------------------------------------- 7. the call goes through
  await step("7. the CI call goes through: the upstream records it, with the gateway's request id", async () => {
    const before = received.length;
    const r = await deploy();
    assert.equal(r.status, 200);
    assert.deepEqual(await r.json(), { upstream: "ok", url: "/apps/billing/deploy" });
    assert.ok(Date.now() < approvedAt + WINDOW_SECONDS * 1000, "inside the window");
    assert.equal(received.length, before + 1);
    const got = received[received.length - 1];
    assert.equal(got.method, "POST");
    assert.equal(got.url, "/apps/billing/deploy");
    assert.equal(got.authorization, undefined, "the token is not forwarded upstream");
    allowedRequestId = r.headers.get("x-request-id");
    assert.ok(allowedRequestId);
    assert.equal(got.requestId, allowedRequestId);
    // The page shows it approved, with the approver's note.
    await page.getByRole("combobox", { name: "Show" }).selectOption("");
    const row = page.locator("#approvals-rows tr", { hasText: "release 4.2" });
    await row.filter({ hasText: "approved until" }).waitFor();
    assert.match(await row.innerText(), /ada@example\.com \(oidc:ada@example\.com\): go ahead/);
  });

  // ---------------------------------------------------------------- 8. the window passes
  await step(`8. after the ${WINDOW_SECONDS} s window the call is 403 approval_required again`, async () => {
    const left = approvedAt + WINDOW_SECONDS * 1000 - Date.now();
    await sleep(Math.max(0, left) + 1500);
    await gatedRefusal(null, "the expired approval is not pending");
    const shown = await fetch(`${adminUrl}/v1/approvals/${approvalId}`, { headers: { authorization: `Bearer ${ci}` } });
    assert.equal(shown.status, 200);
    const a = await shown.json();
    assert.equal(a.status, "expired");
    assert.equal(a.used_count, 1);
  });

  // ---------------------------------------------------------------- 9. the audit log
  await step("9. the audit log holds the whole story in order, no token plaintext, and `audit verify` exits 0", async () => {
    const { text } = await settledAudit(dir);
    assert.equal(text.includes(ci), false, "no CI token plaintext");
    assert.equal(text.includes(personal), false, "no personal token plaintext");
    for (const k of [key.toString("hex")]) assert.equal(text.includes(k), false, "no TOTP key");
    const lines = auditLines(dir);
    const seqs = lines.map((l) => l.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), "in order");
    const admin = (event) => adminEvents(lines, event);
    const one = (event) => {
      const found = admin(event);
      assert.equal(found.length, 1, `exactly one ${event}: ${JSON.stringify(found)}`);
      return found[0];
    };
    const person = "oidc:ada@example.com";

    const accounts = admin("account.created");
    assert.deepEqual(accounts.map((l) => l.account), ["ci-bots", "ada@example.com"], "the operator's, then the first sign-in's");
    const account = accounts[1];
    assert.equal(account.actor, person);
    assert.equal(account.auth_type, "session");
    assert.equal(account.reason, "first_sign_in");
    assert.match(account.target, /^acc_/, "the target is the account id, as for the CLI");
    assert.equal(account.target, account.details.account_id);
    const signIn = one("session.created");
    assert.equal(signIn.actor, person);
    assert.equal(signIn.auth_type, "session");
    assert.equal(signIn.details.sub, "ada");
    assert.equal(signIn.details.email, "ada@example.com");
    assert.equal(signIn.details.issuer, issuer);

    const started = one("mfa.enrollment_started");
    assert.equal(started.actor, person);
    assert.equal(started.auth_type, "session");
    const enrolled = one("mfa.enrolled");
    assert.equal(enrolled.actor, person);
    assert.equal(enrolled.auth_type, "session");
    const mfaFailed = admin("mfa.failed");
    assert.equal(mfaFailed.length, 2, "the two wrong codes");
    for (const f of mfaFailed) {
      assert.equal(f.actor, person);
      assert.equal(f.reason, "wrong_or_reused_code");
    }

    const created = admin("token.created").filter((l) => l.actor === person);
    assert.equal(created.length, 1);
    assert.equal(created[0].account, "ada@example.com");
    assert.equal(created[0].auth_type, "session");
    const refused = one("token.refused");
    assert.equal(refused.actor, person);
    assert.equal(refused.reason, "escalation");
    const capped = lines.filter((l) => l.kind === "request" && l.method === "POST" && l.path === "/v1/tokens" && l.status_code === 409);
    assert.equal(capped.length, 1, "the capped issue has its request line");
    assert.equal(capped[0].reason, "token_limit");

    const requested = one("approval.requested");
    assert.equal(requested.target, approvalId);
    assert.equal(requested.actor, ciCreated.id);
    assert.equal(requested.auth_type, "api_token");
    assert.equal(requested.account, "ci-bots");
    assert.deepEqual(requested.details.params, { app: "billing" });
    assert.equal(requested.details.message, "release 4.2");
    const approved = one("approval.approved");
    assert.equal(approved.target, approvalId);
    assert.equal(approved.actor, person);
    assert.equal(approved.auth_type, "session");
    assert.equal(approved.details.decided_by_account, "ada@example.com");
    assert.equal(approved.details.note, "go ahead");
    const used = one("approval.used");
    assert.equal(used.target, approvalId);
    assert.equal(used.actor, ciCreated.id);
    assert.equal(used.details.request_id, allowedRequestId);
    assert.equal(used.details.use, 1);
    const expired = one("approval.expired");
    assert.equal(expired.target, approvalId);
    assert.equal(expired.actor, "tokengate");
    assert.equal(expired.details.was, "approved");

    const gated = lines.filter((l) => l.kind === "request" && l.path === "/apps/billing/deploy" && l.api_token_id === ciCreated.id);
    const denied = gated.filter((l) => l.reason === "approval_required");
    assert.deepEqual(denied.map((l) => l.request_id), refusals, "the three gated refusals");
    for (const d of denied) {
      assert.equal(d.status_code, 403);
      assert.equal(d.rbac_decision, "deny");
      assert.equal(d.account, "ci-bots");
    }
    const allowed = gated.filter((l) => l.reason === "ok");
    assert.equal(allowed.length, 1);
    assert.equal(allowed[0].request_id, allowedRequestId);
    assert.equal(allowed[0].rbac_decision, "allow");
    assert.equal(allowed[0].permission, "apps:deploy");
    const done = lines.filter((l) => l.kind === "completion" && l.request_id === allowedRequestId);
    assert.equal(done.length, 1);
    assert.equal(done[0].status_code, 200);

    // The story, in the order it happened.
    const at = (l) => l.seq;
    const order = [
      ["session.created", at(signIn)],
      ["mfa.enrolled", at(enrolled)],
      ["token.created", at(created[0])],
      ["token.refused", at(refused)],
      ["token cap (409)", at(capped[0])],
      ["first 403", at(denied[0])],
      ["approval.requested", at(requested)],
      ["403 naming the request", at(denied[1])],
      ["approval.approved", at(approved)],
      // The gate counts the use before the request's decision line is written.
      ["approval.used", at(used)],
      ["allowed call", at(allowed[0])],
      ["approval.expired", at(expired)],
      ["403 after the window", at(denied[2])],
    ];
    const sorted = [...order].sort((a, b) => a[1] - b[1]).map((o) => o[0]);
    assert.deepEqual(sorted, order.map((o) => o[0]));

    // cli() throws unless the command exits 0.
    const verify = cli("audit", "verify");
    assert.equal(verify.trim(), `OK: ${auditLines(dir).length} lines, chain intact`);
  });

  await step("no unexpected console errors (only the refusals the test provoked)", async () => {
    const provoked = /Failed to load resource: the server responded with a status of (403|409)/;
    assert.deepEqual(consoleErrors.filter((e) => !provoked.test(e)), []);
  });
}, { dir });
