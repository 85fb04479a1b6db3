#!/usr/bin/env bash
# Starts the Express app of server.js (installing express from the committed package-lock.json
# when node_modules is missing). Used by tests/trust.rs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
if [ ! -f node_modules/express/package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error >&2
fi
exec node "$here/server.js"
