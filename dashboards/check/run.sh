#!/usr/bin/env bash
# Type-checks every dashboard in dashboards/*.json against @grafana/schema (see check.mjs).
# Installs the pinned packages from package-lock.json first when node_modules is missing or
# out of date. Needs node and npm; exits non-zero on any error.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
command -v node >/dev/null || { echo "run.sh: node not found (apt-get install nodejs npm)" >&2; exit 1; }
command -v npm >/dev/null || { echo "run.sh: npm not found (apt-get install npm)" >&2; exit 1; }
want="$(node -p 'const l=require("./package-lock.json").packages; Object.keys(l).filter(k=>k).map(k=>k+"@"+l[k].version).sort().join(" ")')"
have="$(cat node_modules/.installed-from-lock 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
  npm ci --no-audit --no-fund --loglevel=error >&2
  printf '%s' "$want" > node_modules/.installed-from-lock
fi
exec node check.mjs "$@"
