#!/usr/bin/env bash
# Test it: set up, then run the unit and integration tests (they start their own services).
# Arguments go to pytest (e.g. tests/unit, -k quarantine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
