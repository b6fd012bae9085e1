"""A two-node Ray cluster on this machine (ray.cluster_utils.Cluster: real raylets, real
replica processes) with the SenseVoice application deployed on it, for tests/test_cluster.py.

Everything is loopback-only with free ports and no dashboard, under a Ray temp directory of
its own (RAY_TMPDIR: nothing lands in the /tmp/ray a developer's own Ray uses), and is shut
down however the tests end, leaving no Ray process behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Read by ray when it is imported, and patched below in case it already was: without it
# ray.init rewrites 127.0.0.1 to the machine's routable address, which a node started on
# 127.0.0.1 does not listen on (cluster/__main__.py sets the same for the CLI).
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children() -> dict[int, list[int]]:
    """{pid: its child pids}, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> set[int]:
    tree, found, todo = children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
    except OSError:
        return "(gone)"


@dataclass
class RunningCluster:
    address: str  # the GCS's host:port (SENSEVOICE_CLUSTER_ADDRESS)
    url: str  # the HTTP ingress
    node_ids: list[str]  # head first
    cache_dirs: dict[str, Path]  # node id -> its SENSEVOICE_CACHE_DIR
    env: dict[str, str]  # the environment a CLI subprocess against this cluster needs

    def cli(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """`python -m cluster ARGS` against this cluster."""
        return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)


@contextmanager
def running_cluster(work_dir: Path, model_dir: Path, model_roots: list[Path],
                    replicas: int = 2) -> Iterator[RunningCluster]:
    """A head and one more node, 1 CPU each, each with its own SENSEVOICE_CACHE_DIR (a
    node-local L2 cache), and the application on `model_dir` with one replica per node."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # socket paths must be short
    with pytest.MonkeyPatch.context() as patch:
        settings = {"SENSEVOICE_MODEL_ROOTS": ",".join(str(r) for r in model_roots),
                    "SENSEVOICE_THREADS": "1", "SENSEVOICE_LOG_LEVEL": "INFO",
                    "RAY_TMPDIR": ray_tmp, **LOOPBACK_ONLY}
        for name, value in settings.items():
            patch.setenv(name, value)
        patch.delenv("SENSEVOICE_CLUSTER_ADDRESS", raising=False)
        import ray
        import ray._private.ray_constants
        from ray import serve
        from ray.cluster_utils import Cluster

        from cluster.deploy import deploy_app
        from cluster.types import RAY_NAMESPACE

        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        cluster = Cluster(shutdown_at_exit=True)
        try:
            caches = [work_dir / f"cache-{name}" for name in ("head", "node2")]
            nodes = [cluster.add_node(
                num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False,
                dashboard_agent_listen_port=free_port(),
                env_vars={"SENSEVOICE_CACHE_DIR": str(cache)},
                # include_dashboard=False still runs Ray's headless API server, on 8265
                # unless told: a free port, for clusters run side by side.
                **({"gcs_server_port": free_port(), "dashboard_port": free_port()}
                   if cache is caches[0] else {}))
                for cache in caches]
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, namespace=RAY_NAMESPACE, log_to_driver=False,
                     logging_level="WARNING")
            port = free_port()
            deploy_app(model_dir, replicas, port, max_replicas_per_node=1)
            # The CLI as a user runs it: it must set Ray's loopback knobs itself.
            env = {**{k: v for k, v in os.environ.items() if k not in LOOPBACK_ONLY},
                   "SENSEVOICE_CLUSTER_ADDRESS": cluster.address,
                   "SENSEVOICE_CACHE_DIR": str(work_dir / "cache-cli")}
            yield RunningCluster(cluster.address, f"http://127.0.0.1:{port}",
                                 [node.node_id for node in nodes],
                                 {node.node_id: cache for node, cache in zip(nodes, caches)},
                                 env)
        finally:
            ours = descendants(os.getpid())
            try:
                if ray.is_initialized():
                    serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while any(alive(pid) for pid in ours) and time.monotonic() < deadline:
                    time.sleep(0.1)
                left = {pid: command(pid) for pid in ours if alive(pid)}
                shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"
