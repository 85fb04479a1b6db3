// What the browser tests share, so each *.test.mjs reads as its story only: the environment, the
// step runner and its cleanups, the OpenID provider of tests/oidc, a recording upstream, a gateway
// (`tokengate serve`) on a temp config, headless Chromium, an authenticator app's TOTP codes, and
// the audit log.
//
// Environment: TOKENGATE_BIN (required), CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR
// (default a fresh temp directory).
import { spawn, execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));

// ------------------------------------------------------------------ environment

/** The tokengate binary under test ($TOKENGATE_BIN). */
export const bin = process.env.TOKENGATE_BIN;
if (!bin) throw new Error("set TOKENGATE_BIN to the tokengate binary");
/** The Chromium executable ($CHROMIUM, else Debian's). */
export const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
/** Where screenshots go ($SCREENSHOT_DIR, else a fresh temp directory); it exists. */
export const shots = process.env.SCREENSHOT_DIR || fs.mkdtempSync(path.join(os.tmpdir(), "tokengate-shots-"));
fs.mkdirSync(shots, { recursive: true });

/** Resolves after `ms` milliseconds. */
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------ steps and cleanups

/** How many steps passed and failed so far. */
export const tally = { passed: 0, failed: 0 };
const cleanups = [];

/** Registers `fn` to run at the end, whatever happens; the last registered runs first. */
export function onCleanup(fn) {
  cleanups.push(fn);
}

/** Runs the registered cleanups, last registered first, ignoring their errors. */
export async function runCleanups() {
  for (const c of cleanups.reverse()) {
    try { await c(); } catch (_) { /* best effort */ }
  }
  cleanups.length = 0;
}

/**
 * Runs one step: prints `ok - NAME`, or `not ok - NAME` with the error, and then rethrows it so
 * the steps after a failed one do not run.
 */
export async function step(name, fn) {
  try {
    await fn();
    tally.passed += 1;
    console.log(`ok - ${name}`);
  } catch (e) {
    tally.failed += 1;
    console.log(`not ok - ${name}\n  ${String(e && e.stack || e).split("\n").join("\n  ")}`);
    throw e;
  }
}

/**
 * Runs the steps in `steps` (stopping at the first failure, which step() has reported), then the
 * cleanups, and removes `dir` if given; prints where the screenshots are and `N passed, N failed`,
 * and exits 0 only if at least one step ran and none failed.
 */
export async function runSteps(steps, { dir } = {}) {
  try {
    await steps();
  } catch (_) {
    // already reported by step()
  } finally {
    await runCleanups();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(`screenshots in ${shots}`);
  console.log(`${tally.passed} passed, ${tally.failed} failed`);
  process.exit(tally.failed === 0 && tally.passed > 0 ? 0 : 1);
}

// ------------------------------------------------------------------ the OpenID provider

/**
 * Starts the OpenID provider of tests/oidc (its run.sh runs `npm ci` there first) and resolves to
 * its issuer URL once it prints `listening PORT`. Stopped at cleanup.
 */
export async function startProvider() {
  const provider = spawn("bash", [path.join(here, "..", "oidc", "run.sh")], { stdio: ["ignore", "pipe", "inherit"] });
  onCleanup(() => provider.kill("SIGTERM"));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the OpenID provider did not start")), 180000);
    readline.createInterface({ input: provider.stdout }).on("line", (l) => {
      const m = l.match(/^listening (\d+)$/);
      if (m) { clearTimeout(timer); resolve(`http://127.0.0.1:${m[1]}`); }
    });
    provider.on("exit", (c) => reject(new Error(`the provider exited ${c}`)));
  });
}

// ------------------------------------------------------------------ recording upstream

/**
 * Starts a recording upstream on 127.0.0.1 (a free port). Every request gets 200 with the JSON of
 * `body(req)` and leaves `record(req)` (by default its method, url and headers) in `received`.
 * Resolves to { received, url } (url: `http://127.0.0.1:PORT`). Closed at cleanup.
 */
export async function startUpstream({
  record = (req) => ({ method: req.method, url: req.url, headers: req.headers }),
  body = () => ({ upstream: "ok" }),
} = {}) {
  const received = [];
  const server = http.createServer((req, res) => {
    received.push(record(req));
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(body(req)));
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  onCleanup(() => server.close());
  return { received, url: `http://127.0.0.1:${server.address().port}` };
}

// ------------------------------------------------------------------ gateway

/**
 * The config of a browser test's gateway: both listeners on 127.0.0.1:0, tokengate.db and
 * audit.log in its directory, one route "api" to `upstream` with the rules `rules` (TOML
 * [[routes.rules]] tables); `admin` is appended to [admin] (sections like [admin.oidc]) and
 * `sections` are more top-level sections (like [tokens]).
 */
export function gatewayConfig({ upstream, admin = "", sections = "", rules }) {
  return `[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

${admin}
[store]
path = "tokengate.db"

[audit]
path = "audit.log"

${sections}
[[routes]]
name = "api"
prefix = "/"
upstream = "${upstream}"
${rules}`;
}

/** [admin.oidc] for the test provider at `issuer` (with prepareGateway's client secret). */
export const oidcAdmin = (issuer) => `[admin.oidc]
issuer = "${issuer}"
client_id = "tokengate"
client_secret_file = "client-secret"
allowed_email_domains = ["example.com"]
admin_groups = ["platform-admins"]
self_role = "viewer"
create_accounts = true
`;

/** [admin.mfa] with prepareGateway's TOTP encryption key. */
export const mfaAdmin = `[admin.mfa]
key_file = "mfa.key"
`;

/** The rule that lets apps:read GET and HEAD /apps/{app}/**. */
export const appsReadRule = `
[[routes.rules]]
methods = ["GET", "HEAD"]
path = "/apps/{app}/**"
permission = "apps:read"
`;

/** The rule that lets apps:deploy POST /apps/{app}/deploy, with `extra` keys (like an approval). */
export const deployRule = (extra = "") => `
[[routes.rules]]
methods = ["POST"]
path = "/apps/{app}/deploy"
permission = "apps:deploy"
${extra}`;

/**
 * A fresh temp directory (name starting with `prefix`) holding tokengate.toml with `configText`
 * (relative paths in it are relative to that directory), and, if asked, the OpenID client secret
 * (`client-secret`) and a random TOTP encryption key (`mfa.key`). Returns { dir, config, cli }:
 * cli(...args) runs `tokengate --config CONFIG ARGS`, returns its stdout and throws unless it exits 0.
 * The caller removes `dir` (runSteps does, given it).
 */
export function prepareGateway(prefix, configText, { clientSecret = false, mfaKey = false } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  if (clientSecret) fs.writeFileSync(path.join(dir, "client-secret"), "tokengate-test-secret\n", { mode: 0o600 });
  if (mfaKey) fs.writeFileSync(path.join(dir, "mfa.key"), crypto.randomBytes(32).toString("hex"), { mode: 0o600 });
  const config = path.join(dir, "tokengate.toml");
  fs.writeFileSync(config, configText);
  const cli = (...args) => execFileSync(bin, ["--config", config, ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  return { dir, config, cli };
}

/**
 * Starts `tokengate serve` on `config` (with `env` as its environment, by default this process's)
 * and resolves to { publicUrl, adminUrl } read from its JSON log once both listeners are up.
 * Stopped at cleanup.
 */
export async function startGateway(config, { env = process.env } = {}) {
  const gw = spawn(bin, ["--config", config, "--log-format", "json", "serve"], { env, stdio: ["ignore", "ignore", "pipe"] });
  onCleanup(() => gw.kill("SIGTERM"));
  return new Promise((resolve, reject) => {
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
}

// ------------------------------------------------------------------ the browser

/** Launches headless Chromium (chromiumPath) with the flags a container needs. Closed at cleanup. */
export async function launchBrowser() {
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  onCleanup(() => browser.close());
  return browser;
}

/**
 * Opens a page in a new browser context (`contextOptions`: viewport and so on) and collects its
 * console errors and uncaught page errors. Returns { context, page, consoleErrors }.
 */
export async function openPage(browser, contextOptions) {
  const context = await browser.newContext(contextOptions);
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  return { context, page, consoleErrors };
}

/** The status of `GET /v1/whoami` from `page`, with its cookies: 401 once it is signed out. */
export const whoamiStatus = (page) => page.evaluate(async () => (await fetch("/v1/whoami")).status);

/** Clicks the button named `button` on `page`; checks it lands on the sign-in page, signed out. */
export async function signOutWith(page, button) {
  await page.getByRole("button", { name: button }).click();
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  const status = await whoamiStatus(page);
  if (status !== 401) throw new Error(`still signed in after "${button}": whoami ${status}`);
}

// ------------------------------------------------------------------ an authenticator app
// RFC 6238 (HMAC-SHA1, 6 digits, 30 s steps), as an authenticator app computes it.

/** Decodes a base32 key (RFC 4648, padding allowed) as the page shows it. */
export function base32(s) {
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0, value = 0;
  const out = [];
  for (const c of s.replace(/=+$/, "")) {
    const i = abc.indexOf(c);
    if (i < 0) throw new Error(`not base32: ${c}`);
    value = (value << 5) | i;
    bits += 5;
    if (bits >= 8) { out.push((value >>> (bits - 8)) & 255); bits -= 8; }
  }
  return Buffer.from(out);
}

/** The 6-digit HOTP code of `key` (a Buffer) for `counter`. */
export function hotp(key, counter) {
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(counter));
  const h = crypto.createHmac("sha1", key).update(msg).digest();
  const o = h[h.length - 1] & 15;
  const n = ((h[o] & 0x7f) << 24) | (h[o + 1] << 16) | (h[o + 2] << 8) | h[o + 3];
  return String(n % 1000000).padStart(6, "0");
}

/** The current 30 s TOTP time step. */
export const timeStep = () => Math.floor(Date.now() / 1000 / 30);

/** The TOTP code of `key` for the current time step plus `stepOffset`. */
export const totp = (key, stepOffset = 0) => hotp(key, timeStep() + stepOffset);

// ------------------------------------------------------------------ the audit log

/** The text of the audit log `audit.log` in the gateway's directory `dir`. */
export const auditText = (dir) => fs.readFileSync(path.join(dir, "audit.log"), "utf8");

/** The audit log's lines, parsed. */
export const auditLines = (dir) => auditText(dir).split("\n").filter(Boolean).map((l) => JSON.parse(l));

/** The admin events named `event` among the parsed audit `lines`. */
export const adminEvents = (lines, event) => lines.filter((l) => l.kind === "admin" && l.event === event);

/**
 * The audit log of the gateway in `dir` once its last lines are written (after 300 ms): its
 * `text`, its parsed `lines`, and `ev(name)`, the admin events named `name`.
 */
export async function settledAudit(dir) {
  await sleep(300);
  const lines = auditLines(dir);
  return { text: auditText(dir), lines, ev: (name) => adminEvents(lines, name) };
}
