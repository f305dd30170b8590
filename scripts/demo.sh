#!/usr/bin/env bash
# Run it: set up, then start a whole pipeline on embedded defaults and archive sample logs.
# Arguments go to the demo (e.g. --records 500000, --keep to leave it running for Flower).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m devstack.demo "$@"
