#!/usr/bin/env bash
# Makes a Python virtual environment with the official OpenAI Python SDK (PyPI `openai`, pinned
# below) for the client-compatibility check of `burn-peft serve` (tests/openai/check_sdk.py).
# Needs python3 (>= 3.10, with the venv module) and PyPI on the first run; offline afterwards.
#
#   openai-venv.sh   -> ${BURN_PEFT_OPENAI_VENV:-~/.cache/burn-peft/openai-venv}/
# Prints the path of the environment's python on stdout (pip's chatter goes to stderr).
# Idempotent, and safe when several processes run it at once: they take a lock (flock) on
# <venv>.lock, and a finished environment is marked by <venv>/.burn-peft-openai holding the pin,
# so one that a killed run left half-made is wiped and made again.
set -euo pipefail
pin="openai==3.63.0"
venv="${BURN_PEFT_OPENAI_VENV:-$HOME/.cache/burn-peft/openai-venv}"
marker="$venv/.burn-peft-openai"
ready() { [[ -x "$venv/bin/python" && -f "$marker" && "$(cat "$marker")" == "$pin" ]]; }
if ready; then
  echo "$venv/bin/python"; exit 0
fi
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if ! ready; then
  echo "openai-venv: making $venv with $pin" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$pin" >&2
  "$venv/bin/python" - "${pin#openai==}" <<'PY' >&2
import sys
import openai
if openai.__version__ != sys.argv[1]:
    sys.exit(f"openai-venv: installed openai {openai.__version__}, expected {sys.argv[1]}")
openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="unused")
print(f"openai-venv: openai {openai.__version__} on Python {sys.version.split()[0]}")
PY
  echo "$pin" >"$marker"
fi
echo "$venv/bin/python"
