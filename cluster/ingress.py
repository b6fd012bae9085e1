"""The cluster's HTTP ingress: the UI process's own HTTP API (ui.ops, ui.openai_api) in a Ray
Serve deployment, in front of the model replicas. No Gradio page, no Realtime WebSocket (its
live streams need the supervisor's workers).

The routers are the UI's, not copies: they go through a ui.gateway.Gateway as in the UI
process, whose client is a FleetClient instead of a SupervisorClient. Its settings come from
SENSEVOICE_* on the ingress's node, with SENSEVOICE_CLUSTER_HOST as the address callers reach
(ui_host), so the UI's rules hold here too: internals (paths, pids, the service's own error
sentences) for loopback callers only, reloading never from a non-loopback address without the
admin token (and in cluster mode not over HTTP at all: `python -m cluster reload`).
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.client import FleetClient
from cluster.types import INGRESS_DEPLOYMENT
from sensevoice_core.errors import ServiceError
from sensevoice_core.protocol import ServiceStatus
from sensevoice_core.settings import Settings
from ui.gateway import FrontDoor, Gateway
from ui.metrics import SCRAPE_STATUS_TIMEOUT_S, ServiceMetrics
from ui.openai_api import build_openai_router
from ui.ops import build_ops_router

# Requests the ingress takes beside the front door's transcriptions: /health, /ready,
# /metrics, /v1/models, and refusals answered at once.
OPS_REQUESTS = 16


def front_door_capacity(settings: Settings, replicas: int) -> int:
    """What the fleet can hold, as the supervisor's bound is what it can hold: each replica
    takes up to SENSEVOICE_MAX_BATCH_REQUESTS at once (its max_ongoing_requests), and the
    handle queues SENSEVOICE_MAX_QUEUE more (max_queued_requests) for the first replica with
    room. Beyond it a caller gets 429 at once, from the front door."""
    return settings.max_queue + replicas * settings.max_batch_requests


def ingress_max_ongoing(settings: Settings, replicas: int) -> int:
    """The ingress deployment's max_ongoing_requests: the front door's capacity and the ops
    requests beside it, so the front door, not Ray's proxy, is what refuses a caller."""
    return front_door_capacity(settings, replicas) + OPS_REQUESTS


def cluster_settings() -> Settings:
    """This node's SENSEVOICE_* settings, with the ingress's address as the UI's."""
    settings = Settings()
    return settings.model_copy(update={"ui_host": settings.cluster_host})


@serve.deployment(name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class SenseVoiceIngress:
    """model: a handle to the SenseVoiceModel deployment; replicas: how many it runs."""

    def __init__(self, model: DeploymentHandle, replicas: int):
        self.settings = cluster_settings()
        self.client = FleetClient(model, self.settings)
        self.door = FrontDoor(front_door_capacity(self.settings, replicas),
                              "SENSEVOICE_MAX_QUEUE + replicas x SENSEVOICE_MAX_BATCH_REQUESTS")
        self.gateway = Gateway(self.settings, self.client,
                               ServiceMetrics(self.scrape_status, self.door.held,
                                              self.door.capacity),
                               self.door)

    def scrape_status(self) -> ServiceStatus | None:
        try:
            return self.client.status(timeout=SCRAPE_STATUS_TIMEOUT_S)
        except ServiceError:
            return None

    def __serve_build_asgi_app__(self) -> FastAPI:
        # No /docs: Swagger UI loads its assets from a CDN (as in the UI process).
        app = FastAPI(title="SenseVoice Serve (cluster)", docs_url=None, redoc_url=None)
        app.include_router(build_ops_router(self.gateway))
        app.include_router(build_openai_router(self.gateway))
        return app
