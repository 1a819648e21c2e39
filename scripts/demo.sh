#!/usr/bin/env bash
# Set up everything, then generate an answer with the embedded default model and print its speed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
PROMPT=${1:-"Explain in three sentences why the sky is blue."}
echo "== hass-ext generate \"$PROMPT\""
hass-ext generate "$PROMPT" --max-new-tokens 128
