"""Putting the application on a Ray cluster through a config, as `serve deploy` does, and
reading back what is deployed.

A config deploy (ServeDeploySchema through the Serve controller) is what makes a fleet
reload a lightweight update: redeploying the same config with only the model deployment's
user_config changed reaches each replica's reconfigure() without restarting it. The Python
API's serve.run gives every deploy a new code version, which restarts the replicas.

A driver connecting to a loopback-only cluster (nodes started on 127.0.0.1) must have
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in its environment before `ray` is first imported:
without it ray.init rewrites 127.0.0.1 to the machine's routable address and never reaches
the GCS (cluster/__main__.py sets it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.serve._private import api as serve_api
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from cluster.types import APP_NAME, MODEL_DEPLOYMENT, RAY_NAMESPACE, FleetConfig

CONFIG_FILE = Path(__file__).with_name("serve_config.yaml")
DEPLOY_TIMEOUT_S = 300.0  # first deploy: every replica loads (and builds its L2 snapshot)
CONTROLLER_TIMEOUT_S = 10.0
POLL_S = 0.2


class FleetError(RuntimeError):
    """The cluster or the application is not in a state the command can work with."""


def connect(address: str) -> None:
    """Connect this process to the Ray cluster at `address` (host:port of its GCS)."""
    host = address.rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost") and ray._private.ray_constants.ENABLE_RAY_CLUSTER:
        raise FleetError(f"cannot reach a loopback Ray cluster ({address}) from this process: "
                         f"set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported")
    ray.init(address=address, namespace=RAY_NAMESPACE, log_to_driver=False,
             logging_level="WARNING")


def controller() -> Any:
    """The Serve controller actor; FleetError when Serve is not running on this cluster."""
    try:
        return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        raise FleetError("Ray Serve is not running on this cluster: start it with "
                         "`python -m cluster up` or `serve deploy cluster/serve_config.yaml`"
                         ) from None


def serve_details(timeout_s: float = CONTROLLER_TIMEOUT_S) -> dict[str, Any]:
    """The controller's view (ServeInstanceDetails as a dict): applications, their deployed
    configs, deployments and live replicas (ids, nodes, states, pids)."""
    return ray.get(controller().get_serve_instance_details.remote(), timeout=timeout_s)


def build_config(model_dir: Path, replicas: int, http_host: str, http_port: int,
                 max_replicas_per_node: int | None = None) -> ServeDeploySchema:
    """serve_config.yaml with the model directory, the replica count and the HTTP address
    filled in. max_replicas_per_node=1 spreads replicas one per node."""
    raw = yaml.safe_load(CONFIG_FILE.read_text())
    raw["http_options"].update(host=http_host, port=http_port)
    (app,) = raw["applications"]
    app["args"]["replicas"] = replicas
    model = next(d for d in app["deployments"] if d["name"] == MODEL_DEPLOYMENT)
    model["user_config"] = FleetConfig(model_dir=str(model_dir.resolve())).model_dump()
    if max_replicas_per_node is not None:
        model["max_replicas_per_node"] = max_replicas_per_node
    return ServeDeploySchema.model_validate(raw)


def deploy(config: ServeDeploySchema, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Start Serve (its HTTP proxy as the config says) if it is not running, deploy the
    config and wait until the application runs; FleetError when it fails to."""
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location)
    client.deploy_apps(config)
    wait_running(timeout_s)
    client.wait_for_proxies_serving(wait_for_applications_running=True)


def deploy_app(model_dir: Path, replicas: int, http_port: int, http_host: str = "127.0.0.1",
               max_replicas_per_node: int | None = None,
               timeout_s: float = DEPLOY_TIMEOUT_S) -> ServeDeploySchema:
    """The application on the cluster this process is connected to (ray.init), from
    serve_config.yaml; returns the deployed config."""
    config = build_config(model_dir, replicas, http_host, http_port, max_replicas_per_node)
    deploy(config, timeout_s)
    return config


def redeploy(config: ServeDeploySchema) -> None:
    """Submit a changed config of the running application (no wait: the caller watches the
    replicas' reports)."""
    ray.get(controller().apply_config.remote(config), timeout=CONTROLLER_TIMEOUT_S)


def wait_running(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    status, message = "NOT_STARTED", ""
    while time.monotonic() < deadline:
        app = serve_details()["applications"].get(APP_NAME)
        if app is not None:
            status, message = app["status"], app.get("message", "")
            if status == "RUNNING":
                return
            if status == "DEPLOY_FAILED":
                raise FleetError(f"the application failed to deploy: {failure_cause(app)}")
        time.sleep(POLL_S)
    raise FleetError(f"the application is not running after {timeout_s:g} s ({status}"
                     f"{': ' + message if message else ''})")


def failure_cause(app: dict[str, Any]) -> str:
    """The failed deployment and the last error line of its message (a replica constructor's
    traceback: for the model, "RuntimeError: cannot load the model ...")."""
    for name, deployment in app["deployments"].items():
        if deployment["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
            lines = [line.strip() for line in deployment.get("message", "").splitlines()
                     if line.strip()]
            cause = next((line for line in reversed(lines) if "Error" in line),
                         lines[-1] if lines else "no message")
            return f"{name}: {cause}"
    return app.get("message", "")


def deployed_config(timeout_s: float = CONTROLLER_TIMEOUT_S) -> ServeDeploySchema:
    """The config the running application was deployed with (every config-deployed
    application, so that a redeploy keeps the others)."""
    details = serve_details(timeout_s)
    apps = details["applications"]
    ours = apps.get(APP_NAME)
    if ours is None:
        raise FleetError(f"no application {APP_NAME!r} on this cluster: deploy it with "
                         f"`python -m cluster up` or `serve deploy cluster/serve_config.yaml`")
    if ours.get("deployed_app_config") is None:
        raise FleetError(f"application {APP_NAME!r} was deployed without a config (serve.run); "
                         f"redeploy it from serve_config.yaml so reloads can change its "
                         f"user_config")
    return ServeDeploySchema.model_validate({
        "proxy_location": details["proxy_location"],
        "http_options": details["http_options"],
        # apply_config sets the controller's target capacity from the config: carried over,
        # so that a reload does not reset an operator's setting to 100 %.
        "target_capacity": details.get("target_capacity"),
        "applications": [app["deployed_app_config"] for app in apps.values()
                         if app.get("deployed_app_config") is not None]})


def our_app(config: ServeDeploySchema) -> ServeApplicationSchema:
    return next(app for app in config.applications if app.name == APP_NAME)


def fleet_config(config: ServeDeploySchema) -> FleetConfig:
    """The model deployment's user_config in `config`."""
    model = next((d for d in our_app(config).deployments if d.name == MODEL_DEPLOYMENT), None)
    if model is None or not model.user_config:
        raise FleetError(f"the deployed config sets no user_config for {MODEL_DEPLOYMENT}: "
                         f"deploy serve_config.yaml")
    return FleetConfig.model_validate(model.user_config)


def with_fleet_config(config: ServeDeploySchema, fleet: FleetConfig) -> ServeDeploySchema:
    """`config` with only the model deployment's user_config changed."""
    raw = config.model_dump(exclude_unset=True)
    for app in raw["applications"]:
        if app["name"] == APP_NAME:
            for deployment in app["deployments"]:
                if deployment["name"] == MODEL_DEPLOYMENT:
                    deployment["user_config"] = fleet.model_dump()
    return ServeDeploySchema.model_validate(raw)
