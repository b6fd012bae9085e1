"""Model load times, each in a fresh process: FunASR's AutoModel vs our fresh, L2 and floor.

Run on the full-size random fixture (not in CI):
    python ../shared/tools/make_full_fixture.py /tmp/sensevoice-full
    python bench/load.py --model /tmp/sensevoice-full

Prints the median of --repeats fresh processes for: (a) FunASR AutoModel construction,
(b) our cold load from the official layout into an empty cache (it also writes L2 and L3), (c) our L2 load,
(d) the floor: safetensors' own lazy open of the same snapshot, every tensor fetched,
(e) `import sensevoice_core`; then (a)/(c) and the memory of a process after an L2 load.
Files are in the page cache (a restart), as they are after the first run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PRELUDE = """
import json, os, resource, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
def memory():
    fields = {}
    for line in open(f"/proc/{os.getpid()}/smaps_rollup"):
        key, _, value = line.partition(":")
        if key in ("Rss", "Private_Dirty", "Private_Clean", "Shared_Clean"):
            fields[key] = int(value.split()[0]) * 1024
    fields["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return fields
"""

FUNASR = PRELUDE + """
import torch
from funasr import AutoModel
start = time.perf_counter()
AutoModel(model=sys.argv[1], device="cpu", disable_update=True, disable_pbar=True, disable_log=True)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

OURS = PRELUDE + """
from sensevoice_core.cache import load_sensevoice_cached
from sensevoice_core.settings import Settings
settings = Settings(cache_dir=sys.argv[2])
start = time.perf_counter()
model, report = load_sensevoice_cached(sys.argv[1], force_fresh=sys.argv[3] == "fresh",
                                       settings=settings)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "level": report.level, "steps": report.steps_s,
                  "snapshot": str(report.snapshot), "memory": memory()}))
"""

FLOOR = PRELUDE + """
import torch
from safetensors import safe_open
start = time.perf_counter()
with safe_open(sys.argv[1], framework="pt") as handle:
    tensors = {key: handle.get_tensor(key) for key in handle.keys()}
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

IMPORT = """
import time
start = time.perf_counter()
import sensevoice_core
print('{"seconds": %f}' % (time.perf_counter() - start))
"""


def run(code: str, *args: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                               text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def median_of(repeats: int, code: str, *args: str) -> tuple[float, list[dict]]:
    results = [run(code, *args) for _ in range(repeats)]
    return statistics.median(r["seconds"] for r in results), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="full-size official-layout model directory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-funasr", action="store_true")
    args = parser.parse_args()
    model_dir = str(args.model.resolve())

    with tempfile.TemporaryDirectory(prefix="sensevoice-bench-cache-") as scratch:
        # A cold start each time: an empty cache directory, so the load hashes, loads and
        # writes everything; the L2 runs then reuse the last one.
        fresh = [run(OURS, model_dir, f"{scratch}/cache{i}", "cached")
                 for i in range(args.repeats)]
        fresh_s = statistics.median(r["seconds"] for r in fresh)
        assert all(r["level"] == "fresh" for r in fresh), fresh
        cache_dir = f"{scratch}/cache{args.repeats - 1}"
        l2_s, l2 = median_of(args.repeats, OURS, model_dir, cache_dir, "cached")
        assert all(r["level"] == "L2" for r in l2), [r["level"] for r in l2]
        floor_s, _ = median_of(args.repeats, FLOOR, l2[0]["snapshot"])
    import_s, _ = median_of(args.repeats, IMPORT)

    print(f"model: {model_dir}, median of {args.repeats} fresh processes each")
    if not args.skip_funasr:
        funasr_s, _ = median_of(args.repeats, FUNASR, model_dir)
        print(f"(a) FunASR AutoModel construction     {funasr_s:7.3f} s")
    fresh_steps = {k: round(statistics.median(r["steps"].get(k, 0) for r in fresh), 3)
                   for k in fresh[0]["steps"]}
    print(f"(b) ours, fresh load (+ writes L2/L3) {fresh_s:7.3f} s  steps {fresh_steps}")
    print(f"(c) ours, L2 load                     {l2_s:7.3f} s")
    print(f"(d) floor: safetensors lazy open      {floor_s:7.3f} s")
    print(f"(e) import sensevoice_core            {import_s:7.3f} s")
    if not args.skip_funasr:
        print(f"(a)/(c) = {funasr_s / l2_s:.0f}x;  fresh load vs AutoModel: "
              f"{fresh_s / funasr_s:.2f}x its time")
    memory = l2[-1]["memory"]
    gib = 1 << 30
    print(f"after an L2 load: peak RSS {memory['peak_rss'] / gib:.2f} GiB, RSS "
          f"{memory['Rss'] / gib:.2f} GiB, private (anonymous, dirty) "
          f"{memory['Private_Dirty'] / gib:.3f} GiB; the weights are file pages of the "
          f"snapshot ({(memory['Private_Clean'] + memory['Shared_Clean']) / gib:.2f} GiB "
          f"mapped clean), shared through the page cache")


if __name__ == "__main__":
    main()
