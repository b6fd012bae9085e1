"""python -m cluster [up | down | reload [PATH] [--force-fresh] [--json] | status [--json]]

up runs a local Ray instance (loopback, no dashboard, no usage stats) and the application of
serve_config.yaml on SENSEVOICE_MODEL_DIR with SENSEVOICE_CLUSTER_REPLICAS replicas, HTTP on
SENSEVOICE_CLUSTER_HOST:SENSEVOICE_CLUSTER_PORT, in the foreground until Ctrl-C, SIGTERM or
`down`. reload, status and down talk to SENSEVOICE_CLUSTER_ADDRESS, else to the instance `up`
started (its address is in <SENSEVOICE_CACHE_DIR>/cluster.json).
cluster.json is trusted only when it is this user's, mode 600 and well formed (cluster/state.py).
Exit codes (sensevoice_core.exit_codes): 0 done, 1 failed (no cluster, the HTTP port in use, a
reload that did not succeed everywhere, an error from Ray), 2 invalid settings or a reload path
that is not allowed, 4 the model did not load on `up`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from cluster.state import (
    ClusterState,
    StateClaim,
    StateError,
    held,
    is_up_process,
    read_state,
    state_path,
)
from sensevoice_core.cli import bind_problem, settings_or_exit
from sensevoice_core.exit_codes import (
    EXIT_FAILED,
    EXIT_MODEL_LOAD_ERROR,
    EXIT_OK,
    EXIT_USAGE,
)
from sensevoice_core.logs import configure_logging
from sensevoice_core.settings import Settings

logger = logging.getLogger("sensevoice.cluster")

# Read by ray when it is first imported: without it ray.init turns 127.0.0.1 into the
# machine's routable address, which a loopback-only Ray instance does not listen on.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# `up` keeps Ray's token authentication on (its token: ~/.ray/auth_token), and says so to the
# commands that connect to it: a client left in the default mode is refused.
TOKEN_AUTH_ENV = {"RAY_AUTH_MODE": "token"}
DOWN_TIMEOUT_S = 60.0
GCS_PROBE_S = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="a local Ray instance and the application, in the foreground")
    commands.add_parser("down", help="stop what `up` started (or delete the application)")
    reload = commands.add_parser("reload", help="load a model on every replica")
    reload.add_argument("path", nargs="?", help="model directory; default: the one serving")
    reload.add_argument("--force-fresh", action="store_true",
                        help="load from the model's files, not its L2 snapshot")
    reload.add_argument("--json", action="store_true", help="print the FleetReloadResult")
    status = commands.add_parser("status", help="the replicas and what each serves")
    status.add_argument("--json", action="store_true", help="print the replicas as JSON")
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    configure_logging("cluster", settings.log_level)
    try:
        if args.command == "up":
            return up(settings)
        if args.command == "down" and not settings.cluster_address:
            return down(state_path(settings))
        address, state = locate(settings)
    except StateError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    problem = gcs_problem(address)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_FAILED
    ray_environment(address, state)
    from ray.exceptions import RayError  # ray: only once its environment is set

    from cluster.deploy import FleetError, connect

    try:
        connect(address)
        if args.command == "down":
            return delete_app(address)
        if args.command == "reload":
            return reload_command(settings, args.path, args.force_fresh, args.json)
        return status_command(args.json)
    except (FleetError, RayError, ConnectionError, TimeoutError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"error: {type(e).__name__} from the cluster at {address}: {first}"[:400],
              file=sys.stderr)
        return EXIT_FAILED


def locate(settings: Settings) -> tuple[str, ClusterState | None]:
    """The Ray address to talk to (SENSEVOICE_CLUSTER_ADDRESS, else the running `up`'s), and
    `up`'s cluster.json when that is where it came from; StateError (one line) when neither
    leads to a cluster."""
    if settings.cluster_address:
        return settings.cluster_address, None
    path = state_path(settings)
    state = read_state(path)
    if state is None:
        raise StateError(f"no cluster: no {path} (SENSEVOICE_CACHE_DIR, resolved from this "
                         f"directory): start one with `python -m cluster up`, run this where "
                         f"`up` ran, or set SENSEVOICE_CLUSTER_ADDRESS")
    if not held(path):
        raise StateError(f"no cluster: {path} is stale (its `up`, pid {state.pid}, is gone): "
                         f"`python -m cluster down` removes it")
    if state.address is None:
        raise StateError(f"the cluster of `up` pid {state.pid} is still starting: try again "
                         f"in a moment")
    return state.address, state


def ray_environment(address: str, state: ClusterState | None) -> None:
    """What this process's ray must be imported with to reach `address`."""
    if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
        for name, value in LOOPBACK_RAY_ENV.items():
            os.environ.setdefault(name, value)
    if state is not None and state.address == address and state.auth == "token":
        os.environ.update(TOKEN_AUTH_ENV)


def gcs_problem(address: str) -> str | None:
    """Why no Ray GCS can be at address (host:port), or None. ray.init would wait forever."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"{address!r} is not a Ray address (host:port); fix SENSEVOICE_CLUSTER_ADDRESS"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_PROBE_S):
            return None
    except OSError as e:
        return (f"no Ray cluster answers at {address} ({e.strerror or type(e).__name__}): is it "
                f"running? check SENSEVOICE_CLUSTER_ADDRESS")


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def up(settings: Settings) -> int:
    if settings.model_dir is None or not settings.model_dir.is_dir():
        print(f"error: SENSEVOICE_MODEL_DIR {settings.model_dir or '(unset)'} is not a model "
              f"directory; set it to the model every replica loads", file=sys.stderr)
        return EXIT_USAGE
    problem = bind_problem(settings.cluster_host, settings.cluster_port, "SENSEVOICE_CLUSTER")
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_FAILED
    path = state_path(settings)
    claim = StateClaim.take(path)
    if claim is None:
        try:
            running = read_state(path)
        except StateError:
            running = None
        print(f"error: a cluster is up already (`up` pid {running.pid if running else '?'}, "
              f"{path}): stop it with `python -m cluster down`", file=sys.stderr)
        return EXIT_FAILED
    try:
        claim.write(ClusterState(pid=os.getpid()))
        return run_up(settings, claim)
    finally:
        claim.release()


def run_up(settings: Settings, claim: StateClaim) -> int:
    os.environ.update(LOOPBACK_RAY_ENV | TOKEN_AUTH_ENV)
    # The replicas read their settings from this environment (Ray's workers inherit it), in
    # another working directory: the cache as an absolute path, so they share this one.
    os.environ["SENSEVOICE_CACHE_DIR"] = str(settings.cache_dir.expanduser().resolve())
    import ray
    from ray import serve
    from ray.exceptions import RayError

    from cluster.deploy import FleetError, deploy_app
    from cluster.fleet import fleet_view

    # address="local": a new instance, never the last one any process on this host started
    # (which ray.init() without an address would join). include_dashboard=False still runs
    # Ray's headless API server, on 8265 unless told: a free port, so two `up`s can coexist.
    context = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                       dashboard_port=free_port("127.0.0.1"), log_to_driver=False,
                       logging_level="WARNING")
    address = context.address_info["gcs_address"]
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        claim.write(ClusterState(pid=os.getpid(), address=address, auth="token"))
        logger.info("Ray at %s; deploying %d replica(s) of %s", address,
                    settings.cluster_replicas, settings.model_dir)
        try:
            deploy_app(settings.model_dir, settings.cluster_replicas, settings.cluster_port,
                       settings.cluster_host)
        except FleetError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_MODEL_LOAD_ERROR
        except (RayError, TimeoutError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            print(f"error: Ray Serve did not start: {type(e).__name__}: {first}"[:400],
                  file=sys.stderr)
            return EXIT_FAILED
        models = {v.report.model.fingerprint[:16] for v in fleet_view()
                  if v.report and v.report.model}
        print(f"SenseVoice cluster up: http://{settings.cluster_host}:{settings.cluster_port} "
              f"({settings.cluster_replicas} replica(s), model "
              f"{', '.join(sorted(models)) or '(not reported yet)'}); Ray at "
              f"{address}. Ctrl-C or `python -m cluster down` stops it.", flush=True)
        stop.wait()
        logger.info("stopping")
        return EXIT_OK
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def down(path: Path) -> int:
    """Stop the `up` whose cluster.json is at path (SIGTERM: it shuts Ray down and returns)."""
    state = read_state(path)
    if state is None:
        print(f"error: no cluster: no {path} (SENSEVOICE_CACHE_DIR, resolved from this "
              f"directory): run this where `up` ran, or set SENSEVOICE_CLUSTER_ADDRESS",
              file=sys.stderr)
        return EXIT_FAILED
    stale = StateClaim.take(path)
    if stale is not None:  # nobody held it: its `up` is gone; now it is ours to remove
        stale.release()
        print(f"the cluster's `up` (pid {state.pid}) was gone; removed its {path}")
        return EXIT_OK
    if not is_up_process(state.pid):
        print(f"error: {path} names pid {state.pid}, which is not your `python -m cluster up`; "
              f"not signalled: stop `up` with Ctrl-C where it runs", file=sys.stderr)
        return EXIT_FAILED
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while is_up_process(state.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if is_up_process(state.pid):
        print(f"error: `up` (pid {state.pid}) has not stopped after {DOWN_TIMEOUT_S:g} s",
              file=sys.stderr)
        return EXIT_FAILED
    print("stopped")
    return EXIT_OK


def delete_app(address: str) -> int:
    """`down` against a cluster someone else runs: take only our application off it."""
    from ray import serve

    from cluster.fleet import drop_registry
    from cluster.types import APP_NAME

    serve.delete(APP_NAME)
    drop_registry()  # the next deploy starts at generation 0: none of this one's reloads
    print(f"deleted the application {APP_NAME!r} from {address}")
    return EXIT_OK


def reload_command(settings: Settings, path: str | None, force_fresh: bool, as_json: bool
                   ) -> int:
    from cluster.fleet import reload_fleet
    from supervisor.reload_path import ReloadRefused

    try:
        result = reload_fleet(path, force_fresh, settings)
    except ReloadRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if as_json:
        print(result.model_dump_json(indent=2))
    elif result.ok:
        print(f"reloaded {len(result.replicas)} replica(s) to {result.requested_path} "
              f"(fingerprint {result.fingerprint and result.fingerprint[:16]}) in "
              f"{result.seconds:.1f} s, generation {result.generation}")
    else:
        print(f"reload of {result.requested_path} failed; "
              + ("every replica serves the previous model again" if result.rolled_back
                 else "the rollback did NOT complete: `python -m cluster status` shows what "
                      "each replica serves"))
        for replica, why in sorted(result.failures.items()):
            print(f"  {replica}: {why}")
    return EXIT_OK if result.ok else EXIT_FAILED


def status_command(as_json: bool) -> int:
    from cluster.fleet import fleet_view, last_fleet_reload

    views = fleet_view()
    last = last_fleet_reload()
    if as_json:
        print(json.dumps({
            "replicas": [{"replica_id": v.live.replica_id, "node_id": v.live.node_id,
                          "node_ip": v.live.node_ip, "state": v.live.state, "pid": v.live.pid,
                          "report": v.report.model_dump(mode="json") if v.report else None,
                          "report_age_s": v.age_s}
                         for v in views],
            "last_reload": last.model_dump(mode="json") if last else None}, indent=2))
        return EXIT_OK
    print(f"{'replica':10} {'node':10} {'state':9} {'pid':>7} {'gen':>4} {'fingerprint':17} "
          f"{'cache':6} {'load_s':>6} {'served':>7} {'report':>7}  error")
    for v in views:
        r, model = v.report, v.report.model if v.report else None
        print(f"{v.live.replica_id:10} {v.live.node_id[:8]:10} {v.live.state:9} "
              f"{v.live.pid or '':>7} {r.generation if r else '':>4} "
              f"{model.fingerprint[:16] if model else '-':17} "
              f"{model.cache_level if model else '-':6} "
              f"{f'{model.load_s:.2f}' if model else '-':>6} "
              f"{r.requests_served if r else '':>7} "
              f"{f'{v.age_s:.0f} s ago' if v.age_s is not None else '-':>7}  "
              f"{(r.error or '') if r else ''}")
    if last is not None:
        outcome = "ok" if last.ok else ("failed, rolled back" if last.rolled_back else "failed")
        print(f"last reload: {outcome}, {last.requested_path}, generation {last.generation}, "
              f"{last.seconds:.1f} s"
              + "".join(f"\n  {rid}: {why}" for rid, why in sorted(last.failures.items())))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
