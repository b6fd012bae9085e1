"""The application builder for serve_config.yaml's import_path `cluster.app:application`:
the HTTP ingress in front of the model replicas, with the options that come from SENSEVOICE_*
settings (read on the node that builds the application). The config file's deployment
options (replica CPUs, user_config) apply on top of these."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from cluster.ingress import SenseVoiceIngress, ingress_max_ongoing
from cluster.replica import SenseVoiceModel
from sensevoice_core.settings import Settings


class AppArgs(BaseModel):
    """serve_config.yaml's `args`."""

    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=1)  # model replicas; the ingress sizes its front door by it


def application(args: dict[str, Any]) -> Application:
    parsed = AppArgs.model_validate(args)
    settings = Settings()
    model = SenseVoiceModel.options(
        num_replicas=parsed.replicas,
        # What one replica takes at once; beyond that the handle queues max_queued_requests,
        # then refuses (BackPressureError: "busy"), as the supervisor's full queue does.
        max_ongoing_requests=settings.max_batch_requests,
        max_queued_requests=settings.max_queue)
    ingress = SenseVoiceIngress.options(
        max_ongoing_requests=ingress_max_ongoing(settings, parsed.replicas))
    return ingress.bind(model.bind(), parsed.replicas)
