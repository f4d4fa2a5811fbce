#!/usr/bin/env bash
# The main job on a fresh machine: installs what it needs into ./.venv, then runs
# `metassl-fast bench` (table on stdout; CSV, table and plot under bench/out/).
# Extra arguments go to the benchmark (see .venv/bin/metassl-fast bench --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/metassl-fast info
exec .venv/bin/metassl-fast bench "$@"
