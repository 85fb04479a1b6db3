// Browser test of the web UI's Approvals page in Debian's headless Chromium (playwright-core).
// It starts a real gateway (`tokengate serve`) with an approval-gated rule in front of a small
// recording upstream, then: a CI token's call is refused (403 approval_required); the CI token
// asks for an approval; a person signs in, enrols TOTP from the QR code's key (computing codes here,
// as an authenticator app would), sees the request with who/what/why, approves it with a code; the
// CI call goes through; the audit log holds the story.
//
// Usage: node approvals.test.mjs   (env: TOKENGATE_BIN, CHROMIUM, SCREENSHOT_DIR)
import { spawn, execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const bin = process.env.TOKENGATE_BIN;
if (!bin) throw new Error("set TOKENGATE_BIN to the tokengate binary");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const shots = process.env.SCREENSHOT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), "tokengate-shots-"));
fs.mkdirSync(shots, { recursive: true });

let failed = 0;
const cleanups = [];
async function step(name, fn) {
  try {
    await fn();
    console.log(`ok - ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`not ok - ${name}\n  ${String(e && e.stack || e).split("\n").join("\n  ")}`);
    throw e;
  }
}

// RFC 6238 (SHA-1, 6 digits, 30 s), as an authenticator app computes it.
function base32(s) {
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0, value = 0;
  const out = [];
  for (const c of s) {
    value = (value << 5) | abc.indexOf(c);
    bits += 5;
    if (bits >= 8) { out.push((value >>> (bits - 8)) & 255); bits -= 8; }
  }
  return Buffer.from(out);
}
function totp(secret, stepOffset = 0) {
  const step = Math.floor(Date.now() / 1000 / 30) + stepOffset;
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(step));
  const h = crypto.createHmac("sha1", secret).update(msg).digest();
  const o = h[h.length - 1] & 15;
  const n = ((h[o] & 0x7f) << 24) | (h[o + 1] << 16) | (h[o + 2] << 8) | h[o + 3];
  return String(n % 1000000).padStart(6, "0");
}

const received = [];
const upstream = http.createServer((req, res) => {
  received.push({ method: req.method, url: req.url });
  res.writeHead(200, { "content-type": "application/json" });
  res.end("{}");
});
await new Promise((r) => upstream.listen(0, "127.0.0.1", r));
cleanups.push(() => upstream.close());

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tokengate-approvals-"));
const config = path.join(dir, "tokengate.toml");
fs.writeFileSync(path.join(dir, "mfa.key"), crypto.randomBytes(32).toString("hex"));
fs.writeFileSync(config, `[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[admin.mfa]
key_file = "mfa.key"

[store]
path = "tokengate.db"

[audit]
path = "audit.log"

[[routes]]
name = "api"
prefix = "/"
upstream = "http://127.0.0.1:${upstream.address().port}"

[[routes.rules]]
methods = ["POST"]
path = "/apps/{app}/deploy"
permission = "apps:deploy"
name = "deploy"
approval = { window = "15m", approvers = ["role:admin"] }
`);
const cli = (...args) => execFileSync(bin, ["--config", config, ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
cli("store", "init");
cli("account", "create", "platform");
cli("account", "create", "ci-bots");
const person = JSON.parse(cli("token", "create", "--account", "platform", "--name", "alice-console", "--permission", "tokengate:admin", "--expires", "30d", "--json")).token;
const ci = JSON.parse(cli("token", "create", "--account", "ci-bots", "--name", "deploy", "--permission", "apps:deploy", "--expires", "30d", "--json")).token;

const gw = spawn(bin, ["--config", config, "--log-format", "json", "serve"], { stdio: ["ignore", "ignore", "pipe"] });
cleanups.push(() => gw.kill("SIGTERM"));
const { publicUrl, adminUrl } = await new Promise((resolve, reject) => {
  let buf = "";
  const timer = setTimeout(() => reject(new Error("gateway did not start:\n" + buf)), 20000);
  gw.stderr.on("data", (d) => {
    buf += d.toString();
    for (const line of buf.split("\n")) {
      try {
        const f = JSON.parse(line).fields || {};
        if (f.public && f.admin) {
          clearTimeout(timer);
          resolve({ publicUrl: `http://${f.public}`, adminUrl: `http://${f.admin}` });
        }
      } catch (_) { /* not JSON yet */ }
    }
  });
  gw.on("exit", (c) => reject(new Error(`gateway exited ${c}:\n${buf}`)));
});

const deploy = () => fetch(`${publicUrl}/apps/billing/deploy`, { method: "POST", headers: { authorization: `Bearer ${ci}` } });

const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
});
cleanups.push(() => browser.close());
const page = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
const consoleErrors = [];
page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
page.on("pageerror", (e) => consoleErrors.push(String(e)));

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
    const events = fs.readFileSync(path.join(dir, "audit.log"), "utf8").split("\n").filter(Boolean)
      .map((l) => JSON.parse(l)).filter((l) => l.kind === "admin").map((l) => l.event);
    for (const e of ["approval.requested", "mfa.enrolled", "approval.approved", "approval.used"]) {
      assert.ok(events.includes(e), `${e} in ${events}`);
    }
    cli("audit", "verify");
  });

  await step("no console errors", async () => {
    assert.deepEqual(consoleErrors, []);
  });
} finally {
  for (const c of cleanups.reverse()) { try { await c(); } catch (_) { /* ignore */ } }
}
if (failed) process.exit(1);
console.log("approvals browser test passed");
