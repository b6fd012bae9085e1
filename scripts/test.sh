#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
mkdir -p tests/artifacts
.venv/bin/python -m pytest --junitxml=tests/artifacts/junit.xml "$@"
# pytest already fails when nothing was collected; also fail when everything was skipped.
.venv/bin/python - <<'PY'
import sys, xml.etree.ElementTree as ET
suite = ET.parse("tests/artifacts/junit.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
ran = int(suite.get("tests")) - int(suite.get("skipped"))
print(f"[test] {ran} tests ran")
sys.exit(0 if ran > 0 else 1)
PY
