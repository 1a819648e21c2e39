#!/usr/bin/env bash
# Set up everything, then answer a prompt with the embedded default model: speculative decoding with the shipped
# HASS draft (tree sized for this machine), then the same prompt with the target alone; prints tau and the speedup.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
PROMPT=${1:-"Explain in three sentences why the sky is blue."}
echo "== hass-ext generate \"$PROMPT\" --draft default --stats"
hass-ext generate "$PROMPT" --max-new-tokens 128 --draft default --stats
