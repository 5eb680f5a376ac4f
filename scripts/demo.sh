#!/usr/bin/env bash
# The main job: set up, then draw the bundled model at 25 steps beside 1/2/4/8 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hypersd demo "$@"
