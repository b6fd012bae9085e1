#!/usr/bin/env bash
# Set up (if needed) and run the service on the embedded demo model (model/): the supervisor and
# its inference worker. Once it is serving, the bundled example clips are transcribed through it
# (extra arguments go to that `transcribe`, e.g. --itn or --json). Ctrl-C stops everything.
# The Gradio UI joins here with issue 6.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export SENSEVOICE_MODEL_DIR="${SENSEVOICE_MODEL_DIR:-model}"
.venv/bin/python -m supervisor &
supervisor=$!
trap 'kill -TERM "$supervisor" 2>/dev/null || true; wait "$supervisor" || true' INT TERM EXIT
.venv/bin/python -m supervisor status --wait 120 > /dev/null
.venv/bin/python -m supervisor transcribe ui/examples/*.flac "$@"
echo "[run] serving; try: .venv/bin/python -m supervisor transcribe FILE | status | reload. Ctrl-C stops." >&2
wait "$supervisor"
