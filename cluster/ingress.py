"""The cluster's HTTP ingress: the UI process's own HTTP API (ui.ops, ui.openai_api) in a Ray
Serve deployment, in front of the model replicas. No Gradio page, no Realtime WebSocket (its
live streams need the supervisor's workers).

The routers are the UI's, not copies: they go through a ui.gateway.Gateway as in the UI
process, whose client is a FleetClient instead of a SupervisorClient. Its settings come from
SENSEVOICE_* on the ingress's node, with the host Ray Serve's HTTP proxy really binds (the
controller's http_options, whatever config deployed it) as the address callers reach (ui_host),
so the UI's rules hold here too: internals (paths, pids, the service's own error sentences) for
loopback callers only, reloading never from a non-loopback address without the admin token (and
in cluster mode not over HTTP at all: `python -m cluster reload`).
"""

from __future__ import annotations

import logging

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.client import FleetClient
from cluster.deploy import CONTROLLER_TIMEOUT_S, controller
from cluster.types import INGRESS_DEPLOYMENT
from sensevoice_core.errors import ServiceError
from sensevoice_core.protocol import ServiceStatus
from sensevoice_core.settings import Settings
from ui.gateway import FrontDoor, Gateway
from ui.metrics import SCRAPE_STATUS_TIMEOUT_S, ServiceMetrics
from ui.openai_api import build_openai_router
from ui.ops import build_ops_router

logger = logging.getLogger("sensevoice.cluster")

# Where the proxy binds when Serve's HTTP config cannot be read: taken as reachable from
# anywhere, so internals stay hidden (failing closed).
UNKNOWN_HOST = "0.0.0.0"

# Requests the ingress takes beside the front door's transcriptions: /health, /ready,
# /metrics, /v1/models, and refusals answered at once.
OPS_REQUESTS = 16


def fleet_capacity(settings: Settings, replicas: int) -> int:
    """What the fleet can hold, as the supervisor's bound is what it can hold: each replica
    takes up to SENSEVOICE_MAX_BATCH_REQUESTS at once (its max_ongoing_requests), and the
    handle queues SENSEVOICE_MAX_QUEUE more (max_queued_requests) for the first replica with
    room. Beyond it a caller gets 429 at once, from the front door."""
    return settings.max_queue + replicas * settings.max_batch_requests


def ingress_max_ongoing(settings: Settings, replicas: int) -> int:
    """The ingress deployment's max_ongoing_requests: the front door's capacity and the ops
    requests beside it, so the front door, not Ray's proxy, is what refuses a caller."""
    return fleet_capacity(settings, replicas) + OPS_REQUESTS


def proxy_host() -> str:
    """The host Ray Serve's HTTP proxy binds (its controller's http_options.host)."""
    try:
        config = ray.get(controller().get_http_config.remote(), timeout=CONTROLLER_TIMEOUT_S)
        return config.host or UNKNOWN_HOST
    except Exception as e:  # whatever the failure: fail closed
        logger.warning("Serve's HTTP config could not be read (%s: %s); treating the ingress "
                       "as reachable from other hosts", type(e).__name__, e)
        return UNKNOWN_HOST


def cluster_settings(http_host: str) -> Settings:
    """This node's SENSEVOICE_* settings, with the address the proxy binds as the UI's (not
    SENSEVOICE_CLUSTER_HOST: a config deployed with `serve deploy` may bind elsewhere)."""
    return Settings().model_copy(update={"ui_host": http_host})


@serve.deployment(name=INGRESS_DEPLOYMENT, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class SenseVoiceIngress:
    """model: a handle to the SenseVoiceModel deployment; replicas: how many it runs."""

    def __init__(self, model: DeploymentHandle, replicas: int):
        self.settings = cluster_settings(proxy_host())
        self.client = FleetClient(model, self.settings)
        self.door = FrontDoor(fleet_capacity(self.settings, replicas),
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
