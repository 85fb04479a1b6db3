#!/usr/bin/env bash
# Starts the OpenID provider of provider.mjs (installing oidc-provider from the committed
# package-lock.json when node_modules is missing). Used by tests/oidc.rs and the browser test.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
if [ ! -f node_modules/oidc-provider/package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error >&2
fi
exec node "$here/provider.mjs"
