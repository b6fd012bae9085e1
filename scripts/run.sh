#!/usr/bin/env bash
# Set up (if needed) and run the main job.
# Until the demo model (issue 3) and the service (issues 5, 6) land, the main job runs the whole
# pipeline on the bundled clips with a freshly generated RANDOM model, and says so: its text is noise.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m sensevoice_core random-demo tests/data/en.mp3 tests/data/zh.mp3 "$@"
