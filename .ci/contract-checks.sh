#!/usr/bin/env bash
# Contract hygiene for protos/ (package lepton.v1):
#   1. buf lint     -- protos/buf.yaml (STANDARD, justified per-file exceptions)
#   2. buf breaking -- the protos of the working tree against those of a previous commit
#                      (default HEAD~1; set CONTRACT_AGAINST_REF to compare with another ref,
#                      e.g. origin/main in a pull-request build).
# The buf CLI is pinned in tools/buf/package.json and installed with `npm ci` (needs node + npm).
# Exits non-zero when lint or the breaking check fails; skips the breaking check, with a message,
# when there is no such commit (first commit, shallow clone) or it had no protos/.
set -euo pipefail
cd "$(dirname "$0")/.."

AGAINST_REF=${CONTRACT_AGAINST_REF:-HEAD~1}

for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "contract-checks: '$tool' is not on PATH" >&2; exit 2; }
done

echo "contract-checks: installing the pinned buf CLI (tools/buf)"
timeout 600 npm ci --prefix tools/buf --no-audit --no-fund --loglevel=error
BUF=tools/buf/node_modules/.bin/buf
"$BUF" --version

echo "contract-checks: buf lint protos"
"$BUF" lint protos
echo "contract-checks: buf lint passed"

if ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "contract-checks: not a git checkout; skipping buf breaking"
  exit 0
fi
if ! git rev-parse --verify --quiet "${AGAINST_REF}^{commit}" >/dev/null; then
  echo "contract-checks: no commit '${AGAINST_REF}' (first commit or shallow clone); skipping buf breaking"
  exit 0
fi
if ! git cat-file -e "${AGAINST_REF}:protos" 2>/dev/null; then
  echo "contract-checks: '${AGAINST_REF}' has no protos/; skipping buf breaking"
  exit 0
fi
against_commit=$(git rev-parse "${AGAINST_REF}^{commit}")
echo "contract-checks: buf breaking protos against ${AGAINST_REF} (${against_commit})"
# buf reads the local repository (.git); ref= takes a full commit hash, so a detached or shallow
# checkout works too. The breaking rules are protos/buf.yaml's (FILE).
"$BUF" breaking protos --against ".git#ref=${against_commit},subdir=protos"
echo "contract-checks: buf breaking passed"
