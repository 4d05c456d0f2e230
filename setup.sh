#!/usr/bin/env bash
# One install script for the README, CI (.ci/run) and the Dockerfile.
#   ./setup.sh            create .venv and install the server (CPU torch by default)
#   ./setup.sh --test     ... plus the test dependencies
# Env: AMUSD_VENV (default .venv; "system" installs into the current Python),
#      AMUSD_TORCH_SPEC (default "torch==2.13.0", the CPU wheel; GPU users set e.g. "torch" or
#      their own CUDA build, or "skip" if torch is already installed),
#      AMUSD_EXTRAS (more extras, e.g. "ray" for `amusd serve-ray`).
set -euo pipefail
cd "$(dirname "$0")"
extras="models,bench"
[[ "${1:-}" == "--test" ]] && extras="models,bench,test"
[[ -n "${AMUSD_EXTRAS:-}" ]] && extras="$extras,$AMUSD_EXTRAS"
venv="${AMUSD_VENV:-.venv}"
if [[ "$venv" == "system" ]]; then
  py=python3
else
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  py="$venv/bin/python"
fi
"$py" -m pip install -q --upgrade pip
torch_spec="${AMUSD_TORCH_SPEC:-torch==2.13.0}"
if [[ "$torch_spec" != "skip" ]]; then
  "$py" -m pip install -q "$torch_spec"
fi
"$py" -m pip install -q -e ".[${extras}]"
echo "setup.sh: installed into $("$py" -c 'import sys; print(sys.prefix)') (extras: $extras)"
