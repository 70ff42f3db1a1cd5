#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them all.
# Used by README.md ("run the tests") and by .ci/run; safe to re-run (installs and builds are cached).
#   MS2MG_CACHE   where built Kubernetes test binaries are cached (default /var/cache/ms2mg)
#   PYTEST_ARGS   extra pytest arguments (e.g. "-k roundtrip")
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
log() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

log "python environment"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[converter,operator,test]'

if [ -x scripts/k8s/setup.sh ]; then
  log "Kubernetes test binaries (built once, then cached)"
  scripts/k8s/setup.sh
fi

log "static checks"
.venv/bin/ruff check .
.venv/bin/mypy converter/ms2mg_converter operator/ms2mg_operator
.venv/bin/lint-imports --no-cache

log "tests"
report=$(mktemp -t ms2mg-junit.XXXXXX.xml)
trap 'rm -f "$report"' EXIT
.venv/bin/pytest -q -p no:cacheprovider --junitxml="$report" ${PYTEST_ARGS:-}
# counts from the JUnit report; every skipped test is listed with its reason (MS2MG_STRICT_SKIPS=1, set by .ci/run,
# turns skips into failures: tests/strict_skips.py)
ran=$(.venv/bin/python - "$report" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
skipped = [(c.get("classname", "") + "::" + c.get("name", ""), s.get("message", ""))
           for s_ in suites for c in s_.iter("testcase") for s in c.findall("skipped")]
for name, why in skipped:
    print(f"skipped: {name}: {why}", file=sys.stderr)
total = sum(int(s.get("tests", 0)) for s in suites)
print(f"{total - len(skipped)} {len(skipped)}")
PY
)
read -r ran skipped <<<"$ran"
if [ "$ran" -lt 1 ]; then
  echo "no test ran: failing" >&2
  exit 1
fi
log "done: $ran tests ran, $skipped skipped"
