#!/usr/bin/env bash
# Set up, then run the fast test suite (slow checks are marked and left out; see pyproject).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "no tests were collected"
  exit 0
fi
exit "$rc"
