#!/usr/bin/env bash
# Browser test of the web UI: installs what it needs (Debian's chromium, playwright-core from the
# committed package-lock.json), builds tokengate unless TOKENGATE_BIN is given, and runs
# ui.test.mjs (token sign-in) and oidc.test.mjs (OpenID Connect sign-in against a real provider)
# against a real gateway, approvals.test.mjs (TOTP and approvals with token sign-in), and
# story.test.mjs (issue 19 end to end: OpenID sign-in, TOTP, own tokens within policy, an
# approval-gated CI call, `tokengate approval request --wait`, the window, the audit log).
# What the scripts share (steps, provider, upstream, gateway, Chromium, TOTP, audit log) is in
# harness.mjs.
# Exits non-zero on failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [ ! -x /usr/bin/chromium ]; then
  echo "browser test: installing Debian's chromium" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
if ! command -v node >/dev/null; then
  echo "browser test: installing node and npm" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
cd "$here"
if [ ! -f node_modules/playwright-core/package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
if [ -z "${TOKENGATE_BIN:-}" ]; then
  (cd "$root" && cargo build --quiet --bin tokengate)
  TOKENGATE_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/tokengate"
fi
export TOKENGATE_BIN
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
node "$here/ui.test.mjs"
# Sign-in with OpenID Connect against the provider of tests/oidc (its run.sh runs `npm ci` there).
node "$here/oidc.test.mjs"
# Approvals: a CI token asks, a person enrols TOTP and approves.
node "$here/approvals.test.mjs"
# The whole story, end to end, against the provider, the gateway and the CLI.
exec node "$here/story.test.mjs"
