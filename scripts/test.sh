#!/usr/bin/env bash
# The test suite on a fresh machine: installs what it needs into ./.venv, then runs pytest.
# Extra arguments go to pytest (e.g. bash scripts/test.sh -k clip -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q "$@"
