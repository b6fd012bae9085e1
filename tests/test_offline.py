"""Nothing reaches for the network: a socket audit hook watches a cold load, an L2 load,
the doctor, the converter and transformers' from_pretrained, in a fresh process."""

import json
import subprocess
import sys

AUDITED_RUN = r'''
import json, sys

attempts = []
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def audit(event, args):
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address[0] not in LOOPBACK \
                and not str(address[0]).startswith("127."):
            attempts.append(f"connect {address!r}")
            raise ConnectionRefusedError("network access attempted during an offline test")
    elif event == "socket.getaddrinfo" and args[0] not in (None, *LOOPBACK):
        attempts.append(f"resolve {args[0]!r}")
        raise OSError("name lookup attempted during an offline test")


sys.addaudithook(audit)

from pathlib import Path
from sensevoice_core import Settings, load_sensevoice_cached
from sensevoice_core.doctor import run_checks

model_dir, cache_dir, scratch = map(Path, sys.argv[1:4])
settings = Settings(cache_dir=cache_dir)
levels = [load_sensevoice_cached(model_dir, force_fresh=True, settings=settings)[1].level,
          load_sensevoice_cached(model_dir, settings=settings)[1].level]
checks = run_checks(model_dir, settings, verify=True)

from sensevoice_core.hf import SenseVoiceForCTC, convert_official_to_hf
converted = convert_official_to_hf(model_dir, scratch / "converted")
SenseVoiceForCTC.from_pretrained(converted, local_files_only=True)
print(json.dumps({"attempts": attempts, "levels": levels,
                  "healthy": all(check.ok for check in checks)}))
'''


def test_loads_doctor_and_conversion_attempt_no_network(official_dir, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", AUDITED_RUN, str(official_dir), str(tmp_path / "cache"),
         str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"attempts": [], "levels": ["fresh", "L2"], "healthy": True}


def test_the_hook_would_catch_an_attempt(tmp_path):
    """The audit hook itself works: a real outbound connect is recorded and refused."""
    probe = AUDITED_RUN.split("sys.addaudithook(audit)")[0] + (
        "sys.addaudithook(audit)\n"
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 80), timeout=0.1)\n"
        "except OSError:\n"
        "    pass\n"
        "print(json.dumps(attempts))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["resolve '192.0.2.1'"]
