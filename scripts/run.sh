#!/usr/bin/env bash
# Set up (if needed) and run the whole service on the embedded demo model (model/): the
# supervisor with its inference worker, and the UI + HTTP API on http://127.0.0.1:7860, both from
# the Procfile through honcho. Once serving, the bundled example clips are transcribed through it
# (extra arguments go to that `transcribe`, e.g. --itn or --json). Ctrl-C stops everything.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
if [[ -z "${SENSEVOICE_MODEL_DIR:-}" ]]; then
    # The demo model, and its reload canary: a reload must still transcribe model/canary/.
    export SENSEVOICE_MODEL_DIR=model
    export SENSEVOICE_RELOAD_CANARY_DIR="${SENSEVOICE_RELOAD_CANARY_DIR:-model/canary}"
fi
export PATH="$PWD/.venv/bin:$PATH"
honcho start &
honcho=$!
trap 'kill -TERM "$honcho" 2>/dev/null || true; wait "$honcho" || true' INT TERM EXIT
python -m supervisor status --wait 120 > /dev/null
python -m supervisor transcribe ui/examples/*.flac "$@"
echo "[run] serving: open http://${SENSEVOICE_UI_HOST:-127.0.0.1}:${SENSEVOICE_UI_PORT:-7860}" \
     "(API: POST /v1/audio/transcriptions, GET /health /ready /metrics). Ctrl-C stops." >&2
wait "$honcho"
