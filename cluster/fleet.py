"""The fleet: what each model replica last reported (the registry actor), joined with the
Serve controller's list of live replicas, and a fleet-wide reload with rollback.

The registry is a detached named actor in RAY_NAMESPACE that holds no CPU: each replica
pushes its ReplicaReport on every state change and its counters every few seconds. A
replica that died leaves its last report behind; the controller's list, not the registry,
says which replicas are alive, and reports of the dead are dropped when read.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
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

LIVE_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING")
# Ray updates this fraction of a deployment's replicas at a time (rolling_update_percentage's
# default), so a fleet reload takes about ceil(replicas / batch) replica loads in a row.
ROLLOUT_FRACTION = 0.2
FAILED_GENERATIONS_KEPT = 16


@ray.remote(num_cpus=0)
class FleetRegistry:
    """{replica id: its last ReplicaReport}, each generation's load failures (a replica's
    next report, e.g. the rollback's, replaces its error), and the last fleet reload."""

    def __init__(self) -> None:
        self.reports: dict[str, ReplicaReport] = {}
        self.failed: dict[int, dict[str, str]] = {}  # generation -> {replica id: why}
        self.last_reload: FleetReloadResult | None = None
        self.outcomes: Counter[str] = Counter()  # fleet reloads: "ok" / "failed"
        self.levels: Counter[str] = Counter()  # successful ones by the replicas' cache level
        self.reloading_until = 0.0  # time.time() when a claimed reload is presumed dead

    def put(self, report: ReplicaReport) -> None:
        known = self.reports.get(report.replica_id)
        if known is None or known.reported_at <= report.reported_at:
            self.reports[report.replica_id] = report
        if report.error:
            self.failed.setdefault(report.generation, {})[report.replica_id] = report.error
            for old in sorted(self.failed)[:-FAILED_GENERATIONS_KEPT]:
                del self.failed[old]

    def failures(self, generation: int) -> dict[str, str]:
        return self.failed.get(generation, {})

    def live(self, replica_ids: list[str]) -> list[ReplicaReport]:
        """The reports of these replicas; every other one is forgotten."""
        self.reports = {rid: r for rid, r in self.reports.items() if rid in replica_ids}
        return list(self.reports.values())

    def claim_reload(self, until: float) -> bool:
        """One fleet reload at a time: False while another one's claim holds."""
        if self.reloading_until > time.time():
            return False
        self.reloading_until = until
        return True

    def record_reload(self, result: FleetReloadResult | None) -> None:
        """The reload's result (None: it was abandoned); the claim ends."""
        self.reloading_until = 0.0
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
    by_id = {r.replica_id: r for r in reports}
    return [ReplicaView(r, by_id.get(r.replica_id)) for r in live]


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
    FleetError when the application is not deployed from a config."""
    start = time.monotonic()
    config = deployed_config()
    current = fleet_config(config)
    views = fleet_view()
    served = serving_model([v.report for v in views if v.report is not None])
    target = check_reload_path(path, served, settings.model_roots,
                               configured=Path(current.model_dir)) or current.model_dir
    new = FleetConfig(model_dir=target, force_fresh=force_fresh,
                      generation=current.generation + 1)
    timeout_s = reload_timeout(settings, len(views))
    claim_until = time.time() + 2 * timeout_s + CONTROLLER_TIMEOUT_S
    if not ray.get(registry().claim_reload.remote(claim_until), timeout=CONTROLLER_TIMEOUT_S):
        raise FleetError("another fleet reload is under way: wait for it to finish "
                         "(`python -m cluster status` shows the generations)")
    try:
        result = roll_out(current, new, config, timeout_s)
    except BaseException:
        registry().record_reload.remote(None)
        raise
    result = result.model_copy(update={"seconds": time.monotonic() - start})
    registry().record_reload.remote(result)
    return result


def roll_out(current: FleetConfig, new: FleetConfig, config: ServeDeploySchema,
             timeout_s: float) -> FleetReloadResult:
    """Deploy `new`; on any failure deploy `current` again (as the next generation)."""
    redeploy(with_fleet_config(config, new))
    reports, failures = wait_generation(new.generation, timeout_s)
    rolled_back = False
    if failures:
        back = current.model_copy(update={"generation": new.generation + 1,
                                          "force_fresh": False})
        redeploy(with_fleet_config(config, back))
        reports, back_failures = wait_generation(back.generation, timeout_s)
        rolled_back = True
        # Replicas Ray had already given the new config when the first failure came.
        live = {r.replica_id for r in reports}
        failures |= {rid: why for rid, why in ray.get(registry().failures.remote(
            new.generation), timeout=CONTROLLER_TIMEOUT_S).items() if rid in live}
        failures |= {rid: f"rollback: {why}" for rid, why in back_failures.items()
                     if rid not in failures}
    fingerprints = Counter(r.model.fingerprint for r in reports if r.model is not None)
    return FleetReloadResult(
        ok=not failures, requested_path=new.model_dir,
        fingerprint=fingerprints.most_common(1)[0][0] if fingerprints and not failures
        else None,
        generation=new.generation, seconds=0.0, replicas=reports,
        failures=failures, rolled_back=rolled_back)


def reload_timeout(settings: Settings, replicas: int) -> float:
    """SENSEVOICE_HOTRELOAD_TIMEOUT for each of Ray's rollout steps (one load each)."""
    step = max(1, int(ROLLOUT_FRACTION * replicas))
    return settings.hotreload_timeout * max(1, math.ceil(replicas / step))


def wait_generation(generation: int, timeout_s: float
                    ) -> tuple[list[ReplicaReport], dict[str, str]]:
    """Until every live replica has applied `generation` (or a later one), or one failed
    to (then at once: the caller rolls back); the live replicas' reports and the failures,
    {replica id: why}."""
    deadline = time.monotonic() + timeout_s
    views: list[ReplicaView] = []
    while True:
        views = fleet_view()
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
                for v in views if v.report is None or v.report.generation < generation}
        time.sleep(POLL_S)
