"""End-to-end latency through UI -> supervisor -> worker against in-process inference (not a test).

    python bench/ui_overhead.py                        # the embedded demo model
    python bench/ui_overhead.py --model /tmp/sensevoice-full --runs 20

Starts the real supervisor and `python -m ui` on the model, then times the same 5 s clip (the
first 5 s of tests/data/zh.mp3, as FLAC bytes) many times, one request at a time:
- in process: `SenseVoice.transcribe(bytes)` in this process (decode + features + model);
- supervisor client: ZeroMQ to the supervisor, which forwards to the worker;
- HTTP: POST /v1/audio/transcriptions on the UI process (multipart, keep-alive);
- Gradio API: the page's pinned transcribe endpoint over plain HTTP, as the browser does it
  (POST /gradio_api/call/transcribe, then its event stream; the clip uploaded once, as the
  page uploads a file once however often you press Transcribe);
- gradio_client: the same endpoint through the gradio_client library (which adds its own
  ~100 ms of polling and threads on the client side).
It prints the median and p90 of each, and the median overhead over in-process inference.
Every process runs torch with the same thread count.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import soundfile
import torch
from gradio_client import Client, handle_file

from sensevoice_core.audio import load_audio
from sensevoice_core.cache import load_sensevoice_cached
from sensevoice_core.client import SupervisorClient
from sensevoice_core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
CLIP_S = 5.0


def five_second_clip(source: Path) -> bytes:
    samples = load_audio(source).numpy()[: int(16000 * CLIP_S)]
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="FLAC")
    return buffer.getvalue()


def timings(call: Callable[[], object], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def gradio_call(http: httpx.Client, api_name: str, data: list) -> None:
    """One call of a Gradio endpoint over plain HTTP: submit, then read its event stream."""
    event_id = http.post(f"/gradio_api/call/{api_name}", json={"data": data}).json()["event_id"]
    with http.stream("GET", f"/gradio_api/call/{api_name}/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: complete"):
                return
            if line.startswith("event: error"):
                raise RuntimeError(f"{api_name} failed: {line}")
    raise RuntimeError(f"{api_name}: the event stream ended without a result")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "model")
    parser.add_argument("--clip", type=Path, default=REPO / "tests" / "data" / "zh.mp3")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--port", type=int, default=7899)
    args = parser.parse_args()

    clip = five_second_clip(args.clip)
    work = Path(tempfile.mkdtemp(prefix="ui-bench-"))
    clip_path = work / "clip.flac"
    clip_path.write_bytes(clip)
    address = f"ipc://{work}/s.ipc"
    env = {**os.environ, "SENSEVOICE_MODEL_DIR": str(args.model.resolve()),
           "SENSEVOICE_CACHE_DIR": str(work / "cache"), "SENSEVOICE_SUPERVISOR_ADDRESS": address,
           "SENSEVOICE_THREADS": str(args.threads), "SENSEVOICE_UI_PORT": str(args.port),
           "SENSEVOICE_WARM_STANDBY": "false", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(work / "gradio")}
    log = open(work / "service.log", "wb")
    processes = [subprocess.Popen([sys.executable, "-m", name], env=env, cwd=work, stdout=log,
                                  stderr=subprocess.STDOUT) for name in ("supervisor", "ui")]
    try:
        client = SupervisorClient(address, Settings(supervisor_address=address))
        wait_for(lambda: client.status().model is not None, "the worker")
        url = f"http://127.0.0.1:{args.port}"
        http = httpx.Client(base_url=url, timeout=120)
        wait_for(lambda: http.get("/ready").status_code == 200, "the UI")

        torch.set_num_threads(args.threads)
        model, _ = load_sensevoice_cached(args.model, settings=Settings(cache_dir=work / "cache"))
        gradio = Client(url, verbose=False)
        upload = handle_file(str(clip_path))
        uploaded = http.post("/gradio_api/upload",
                             files={"files": ("clip.flac", clip)}).json()[0]
        file_data = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
        ways = {
            "in process": lambda: model.transcribe(clip),
            "supervisor client (ZeroMQ)": lambda: client.transcribe(clip),
            "HTTP /v1/audio/transcriptions": lambda: http.post(
                "/v1/audio/transcriptions", files={"file": ("clip.flac", clip)}).raise_for_status(),
            "Gradio API /gradio_api/call": lambda: gradio_call(
                http, "transcribe", [file_data, "auto", True]),
            "gradio_client /transcribe": lambda: gradio.predict(upload, "auto", True,
                                                                api_name="/transcribe"),
        }
        print(f"model {args.model} · {CLIP_S:g} s clip · {args.runs} runs each · "
              f"{args.threads} threads per process")
        results = {name: timings(call, args.runs) for name, call in ways.items()}
        base = statistics.median(results["in process"])
        for name, times in results.items():
            median = statistics.median(times)
            p90 = sorted(times)[int(0.9 * (len(times) - 1))]
            overhead = "" if name == "in process" else f"   overhead {1000 * (median - base):+.1f} ms"
            print(f"  {name:32s} median {1000 * median:7.1f} ms   p90 {1000 * p90:7.1f} ms{overhead}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


if __name__ == "__main__":
    main()
