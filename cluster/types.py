"""What the cluster's processes tell each other: the model deployment's user_config, what each
replica reports about itself, and a fleet reload's outcome."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from sensevoice_core.protocol import ModelInfo, ReloadOutcome

APP_NAME = "sensevoice"  # the Ray Serve application
MODEL_DEPLOYMENT = "SenseVoiceModel"
INGRESS_DEPLOYMENT = "SenseVoiceIngress"
RAY_NAMESPACE = "sensevoice"  # where the fleet registry actor lives
REGISTRY_NAME = "sensevoice-fleet"


class FleetConfig(BaseModel):
    """The model deployment's user_config: what every replica should serve. A change reaches
    each live replica's reconfigure() without restarting it (Ray's lightweight update)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model_dir: str  # absolute; the same path must hold the model on every node
    force_fresh: bool = False  # skip L2 (and L3's claim) for this load
    generation: int = Field(0, ge=0)  # bumped by each `python -m cluster reload`


class ReplicaReport(BaseModel):
    """One model replica, as it last told the fleet registry."""

    replica_id: str  # Ray Serve's replica id
    node_id: str
    node_ip: str
    pid: int
    started_at: float  # time.time() when its constructor ran
    reported_at: float
    generation: int  # the FleetConfig generation it last applied, or failed to
    model: ModelInfo | None  # what it serves (None before its first load succeeded)
    error: str | None = None  # why the load of `generation` failed (old model kept), if it did
    last_reload: ReloadOutcome | None = None
    requests_served: int = 0
    in_flight: int = 0
    threads: int = 0  # torch threads of its compute (0: not reported)
    batches: int = 0  # batched forward passes it ran (cross-request batching)
    batch_items: int = 0  # items (requests' segments) in those passes


class FleetReloadResult(BaseModel):
    """`python -m cluster reload`'s answer: ok when every replica serves the new fingerprint."""

    ok: bool
    requested_path: str
    fingerprint: str | None = None  # the new model's, when ok
    generation: int
    seconds: float  # command -> every replica answered
    replicas: list[ReplicaReport]
    failures: dict[str, str] = {}  # replica id -> why it does not serve the new model
    rolled_back: bool = False  # a failure put the previous config back on every replica
