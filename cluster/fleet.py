"""The fleet: what each model replica last reported (the registry actor), joined with the
Serve controller's list of live replicas, and a fleet-wide reload with rollback.

The registry is a detached named actor in RAY_NAMESPACE that holds no CPU: each replica
pushes its ReplicaReport on every state change and its counters every few seconds. A
replica that died leaves its last report behind; the controller's list, not the registry,
says which replicas are alive, and reports of the dead are dropped when read.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError
from ray.serve.schema import ServeDeploySchema

from cluster.deploy import (
    CONTROLLER_TIMEOUT_S,
    POLL_S,
    FleetError,
    deployed_config,
    fleet_config,
    redeploy,
    serve_details,
    with_fleet_config,
)
from cluster.types import (
    APP_NAME,
    MODEL_DEPLOYMENT,
    RAY_NAMESPACE,
    REGISTRY_NAME,
    FleetConfig,
    FleetReloadResult,
    ReplicaReport,
)
from sensevoice_core.protocol import ModelInfo
from sensevoice_core.settings import Settings
from supervisor.reload_path import check_reload_path

logger = logging.getLogger("sensevoice.cluster")

# PENDING_MIGRATION: a replica on a draining node, still serving until its replacement runs.
LIVE_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING", "PENDING_MIGRATION")
# Ray updates this fraction of a deployment's replicas at a time (rolling_update_percentage's
# default), so a fleet reload takes about ceil(replicas / batch) replica loads in a row.
ROLLOUT_FRACTION = 0.2
FAILED_GENERATIONS_KEPT = 16
REPORT_INTERVAL_S = 5.0  # each replica re-sends its whole report this often (a heartbeat)
# A report this old is dropped: its replica is gone (a live one re-sends every interval).
STALE_REPORT_S = 12 * REPORT_INTERVAL_S
FLEET_FAILURE = "fleet"  # the failures key of a reload that broke off, not one replica's load
# The head node's own resource: the registry lives there, and so it outlives any worker node.
HEAD_NODE = {"node:__internal_head__": 0.001}


@ray.remote(num_cpus=0, resources=HEAD_NODE, max_restarts=-1)
class FleetRegistry:
    """{replica id: its last ReplicaReport and when it arrived}, each generation's load
    failures (a replica's next report, e.g. the rollback's, replaces its error), and the last
    fleet reload. Restarted empty if it dies; the replicas' heartbeats fill it again."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[ReplicaReport, float]] = {}  # -> (report, time.time())
        self.failed: dict[int, dict[str, str]] = {}  # generation -> {replica id: why}
        self.last_reload: FleetReloadResult | None = None
        self.outcomes: Counter[str] = Counter()  # fleet reloads: "ok" / "failed"
        self.levels: Counter[str] = Counter()  # successful ones by the replicas' cache level
        self.claim: tuple[str, float] | None = None  # (owner, time.time() it is presumed dead)

    def put(self, report: ReplicaReport) -> None:
        now = time.time()
        known = self.reports.get(report.replica_id)
        if known is None or known[0].reported_at <= report.reported_at:
            self.reports[report.replica_id] = (report, now)
        if report.error:
            self.failed.setdefault(report.generation, {})[report.replica_id] = report.error
            for old in sorted(self.failed)[:-FAILED_GENERATIONS_KEPT]:
                del self.failed[old]
        self.reports = {rid: (r, at) for rid, (r, at) in self.reports.items()
                        if now - at < STALE_REPORT_S}

    def failures(self, generation: int) -> dict[str, str]:
        return self.failed.get(generation, {})

    def live(self, replica_ids: list[str]) -> list[tuple[ReplicaReport, float]]:
        """The reports of these replicas, each with its age in seconds (since it arrived)."""
        now = time.time()
        return [(r, now - at) for rid, (r, at) in self.reports.items() if rid in replica_ids]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def claim_reload(self, owner: str, until: float) -> bool:
        """One fleet reload at a time: False while another owner's claim holds (the holder
        may extend its own)."""
        if self.claim is not None and self.claim[0] != owner and self.claim[1] > time.time():
            return False
        self.claim = (owner, until)
        return True

    def record_reload(self, owner: str, result: FleetReloadResult | None) -> None:
        """The reload's result (None: it did not start); the owner's claim ends."""
        if self.claim is not None and self.claim[0] == owner:
            self.claim = None
        if result is None:
            return
        self.last_reload = result
        self.outcomes["ok" if result.ok else "failed"] += 1
        levels = Counter(r.last_reload.cache_level for r in result.replicas
                         if r.generation == result.generation and r.last_reload is not None
                         and r.last_reload.ok and r.last_reload.cache_level is not None)
        if result.ok and levels:
            self.levels[levels.most_common(1)[0][0]] += 1

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Fleet reloads by outcome, and successful ones by cache level (L1, L2, fresh)."""
        return dict(self.outcomes), dict(self.levels)

    def get_last_reload(self) -> FleetReloadResult | None:
        return self.last_reload


def registry() -> Any:
    """The fleet registry actor, created by whoever asks first."""
    return FleetRegistry.options(name=REGISTRY_NAME, namespace=RAY_NAMESPACE,
                                 lifetime="detached", get_if_exists=True).remote()


def drop_registry() -> None:
    """End the fleet registry for good (after the application is deleted), so that the next
    deploy, whose generations start at 0 again, does not show this one's reloads."""
    try:
        actor = ray.get_actor(REGISTRY_NAME, namespace=RAY_NAMESPACE)
    except ValueError:
        return
    ray.kill(actor, no_restart=True)


@dataclass(frozen=True)
class LiveReplica:
    """A model replica as the Serve controller lists it."""

    replica_id: str
    node_id: str
    node_ip: str
    state: str
    pid: int | None


@dataclass(frozen=True)
class ReplicaView:
    live: LiveReplica
    report: ReplicaReport | None  # None until the replica first reported
    age_s: float | None = None  # seconds since the registry received `report`


def live_replicas(timeout_s: float = CONTROLLER_TIMEOUT_S) -> list[LiveReplica]:
    app = serve_details(timeout_s)["applications"].get(APP_NAME)
    if app is None or MODEL_DEPLOYMENT not in app["deployments"]:
        return []
    replicas = [LiveReplica(replica_id=r["replica_id"], node_id=r.get("node_id") or "",
                            node_ip=r.get("node_ip") or "",
                            state=getattr(r["state"], "value", r["state"]),  # a ReplicaState
                            pid=r.get("pid"))
                for r in app["deployments"][MODEL_DEPLOYMENT]["replicas"]]
    return [r for r in replicas if r.state in LIVE_STATES]


def fleet_view(timeout_s: float = CONTROLLER_TIMEOUT_S) -> list[ReplicaView]:
    """Every live model replica with its last report (reports of dead ones dropped)."""
    live = live_replicas(timeout_s)
    reports = ray.get(registry().live.remote([r.replica_id for r in live]), timeout=timeout_s)
    by_id = {report.replica_id: (report, age) for report, age in reports}
    return [ReplicaView(r, *by_id.get(r.replica_id, (None, None))) for r in live]


def live_reports(timeout_s: float) -> list[ReplicaReport]:
    """The live replicas' last reports (what FleetClient.status builds on); TimeoutError
    when the controller or the registry does not answer in time."""
    return [view.report for view in fleet_view(timeout_s) if view.report is not None]


def last_fleet_reload(timeout_s: float = CONTROLLER_TIMEOUT_S) -> FleetReloadResult | None:
    return ray.get(registry().get_last_reload.remote(), timeout=timeout_s)


def reload_counts(timeout_s: float = CONTROLLER_TIMEOUT_S
                  ) -> tuple[dict[str, int], dict[str, int]]:
    """Fleet reloads since the registry began, by outcome and (successful) by cache level."""
    return ray.get(registry().counts.remote(), timeout=timeout_s)


def serving_model(reports: list[ReplicaReport]) -> ModelInfo | None:
    """The model most replicas serve (during a fleet reload, the newer generation's on a
    tie)."""
    serving = [(r.model, r.generation) for r in reports if r.model is not None]
    if not serving:
        return None
    counts = Counter(model.fingerprint for model, _ in serving)
    model, _ = max(serving, key=lambda each: (counts[each[0].fingerprint], each[1]))
    return model


def reload_fleet(path: str | None, force_fresh: bool, settings: Settings) -> FleetReloadResult:
    """Every replica loads `path` (None: the directory served now); any failure puts the
    previous model back on every replica. ReloadRefused for a path that is not allowed,
    FleetError when the application is not deployed from a config or another reload runs."""
    start = time.monotonic()
    owner = uuid.uuid4().hex
    # Claimed before the deployed config is read, so that two reloads never read the same
    # generation.
    claim(owner, CLAIM_SETUP_S)
    result: FleetReloadResult | None = None
    try:
        config = deployed_config()
        current = fleet_config(config)
        views = fleet_view()
        served = serving_model([v.report for v in views if v.report is not None])
        target = check_reload_path(path, served, settings.model_roots,
                                   configured=Path(current.model_dir)) or current.model_dir
        new = FleetConfig(model_dir=target, force_fresh=force_fresh,
                          generation=current.generation + 1)
        timeout_s = reload_timeout(settings, len(views))
        # Two waits (the rollout, a rollback), each overrunning by at most one poll.
        claim(owner, 2 * (timeout_s + CONTROLLER_TIMEOUT_S) + CLAIM_SETUP_S)
        result = roll_out(config, current, new, timeout_s)
        result = result.model_copy(update={"seconds": time.monotonic() - start})
        return result
    finally:
        try:
            ray.get(registry().record_reload.remote(owner, result), timeout=CONTROLLER_TIMEOUT_S)
        except (RayError, TimeoutError):
            logger.warning("could not record the reload in the fleet registry: its claim "
                           "expires by itself", exc_info=True)


CLAIM_SETUP_S = 3 * CONTROLLER_TIMEOUT_S  # reading the config and the fleet, deploying


def claim(owner: str, seconds: float) -> None:
    if not ray.get(registry().claim_reload.remote(owner, time.time() + seconds),
                   timeout=CONTROLLER_TIMEOUT_S):
        raise FleetError("another fleet reload is under way: wait for it to finish "
                         "(`python -m cluster status` shows the generations)")


def roll_out(config: ServeDeploySchema, current: FleetConfig, new: FleetConfig,
             timeout_s: float) -> FleetReloadResult:
    """Deploy `new`; on any failure after that, whatever it is (a replica's load error,
    fingerprints that disagree, the controller not answering, Ctrl-C), deploy `current`
    again as the next generation."""
    try:
        redeploy(with_fleet_config(config, new))
        reports, failures = wait_generation(new.generation, timeout_s)
        failures = failures or disagreeing(reports, new.generation)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - rolled back, then reported
        reports, failures = [], {FLEET_FAILURE: f"the reload broke off: {type(e).__name__}: {e}"}
    if not failures:
        (fingerprint,) = {r.model.fingerprint for r in reports if r.model is not None}
        return FleetReloadResult(ok=True, requested_path=new.model_dir, fingerprint=fingerprint,
                                 generation=new.generation, seconds=0.0, replicas=reports)
    back_reports, back_failures = roll_back(current, new.generation, timeout_s)
    live = {r.replica_id for r in back_reports}
    try:  # replicas Ray had already given the new config when the first failure came
        failed = ray.get(registry().failures.remote(new.generation), timeout=CONTROLLER_TIMEOUT_S)
    except (RayError, TimeoutError):
        failed = {}
    failures |= {rid: why for rid, why in failed.items() if rid in live}
    failures |= {rid: f"rollback: {why}" for rid, why in back_failures.items()
                 if rid not in failures}
    return FleetReloadResult(ok=False, requested_path=new.model_dir, generation=new.generation,
                             seconds=0.0, replicas=back_reports or reports, failures=failures,
                             rolled_back=not back_failures)


def roll_back(previous: FleetConfig, failed_generation: int, timeout_s: float
              ) -> tuple[list[ReplicaReport], dict[str, str]]:
    """Deploy `previous` again, changing only our user_config in what is deployed NOW (not
    in the snapshot the reload began with: another application's deploy meanwhile stays);
    the live replicas' reports and what kept the rollback from completing."""
    try:
        config = deployed_config()
        generation = max(failed_generation, fleet_config(config).generation) + 1
        back = previous.model_copy(update={"generation": generation, "force_fresh": False})
        redeploy(with_fleet_config(config, back))
        return wait_generation(back.generation, timeout_s)
    except Exception as e:  # noqa: BLE001 - reported: the rollback did not complete
        return [], {FLEET_FAILURE: f"the rollback broke off: {type(e).__name__}: {e}"}


def disagreeing(reports: list[ReplicaReport], generation: int) -> dict[str, str]:
    """{replica id: why} when the replicas that applied `generation` do not all serve one
    model (the path held different files on different nodes); {} when they do."""
    by_fingerprint: dict[str | None, list[str]] = {}
    for r in reports:
        if r.generation >= generation:
            fingerprint = r.model.fingerprint if r.model is not None else None
            by_fingerprint.setdefault(fingerprint, []).append(r.replica_id)
    if len(by_fingerprint) <= 1 and None not in by_fingerprint:
        return {}
    seen = ", ".join(f"{fp[:16] if fp else 'no model'} on {len(ids)}"
                     for fp, ids in by_fingerprint.items())
    return {rid: f"generation {generation} is not one model across the fleet ({seen}): "
                 f"this replica serves {fp[:16] if fp else 'no model'}; check that the "
                 f"directory holds the same files on every node"
            for fp, ids in by_fingerprint.items() for rid in ids}


def reload_timeout(settings: Settings, replicas: int) -> float:
    """SENSEVOICE_HOTRELOAD_TIMEOUT for each of Ray's rollout steps (one load each)."""
    step = max(1, int(ROLLOUT_FRACTION * replicas))
    return settings.hotreload_timeout * max(1, math.ceil(replicas / step))


def wait_generation(generation: int, timeout_s: float
                    ) -> tuple[list[ReplicaReport], dict[str, str]]:
    """Until every live replica has applied `generation` (or a later one), or one failed
    to (then at once: the caller rolls back); the live replicas' reports and the failures,
    {replica id: why}. A poll the controller or the registry does not answer in time is no
    news: the wait goes on until the deadline."""
    deadline = time.monotonic() + timeout_s
    views: list[ReplicaView] = []
    while True:
        remaining = deadline - time.monotonic()
        try:
            views = fleet_view(max(1.0, min(CONTROLLER_TIMEOUT_S, remaining)))
        except (TimeoutError, RayError) as e:  # slow, or the registry restarting
            logger.warning("the Serve controller or the fleet registry did not answer (%s); "
                           "waiting on", e)
        reports = [v.report for v in views if v.report is not None]
        failures = {r.replica_id: r.error for r in reports
                    if r.generation == generation and r.error is not None}
        if failures:
            return reports, {rid: why or "" for rid, why in failures.items()}
        done = [r for r in reports if r.generation >= generation]
        if views and len(done) == len(views):
            return reports, {}
        if time.monotonic() >= deadline:
            return reports, {
                v.live.replica_id: f"did not apply generation {generation} within "
                                   f"{timeout_s:g} s (state {v.live.state})"
                for v in views if v.report is None or v.report.generation < generation} or {
                FLEET_FAILURE: f"no live replica listed within {timeout_s:g} s"}
        time.sleep(POLL_S)
