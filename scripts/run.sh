#!/usr/bin/env bash
# Set up (if needed) and run the main job.
# Until the service lands (supervisor, worker and UI: issues 5 and 6), the main job transcribes
# the bundled example clips with the embedded demo model in model/ (see model/README.md for what
# it can and cannot recognise). Extra arguments go to `transcribe` (e.g. --itn, --json, files).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
if [ "$#" -eq 0 ]; then
    set -- ui/examples/*.flac
fi
exec .venv/bin/python -m sensevoice_core transcribe --model model "$@"
