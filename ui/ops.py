"""GET /health (this process is up), GET /ready (a worker is serving), GET /metrics (Prometheus).

/ready names the model directory only to loopback callers, or with the admin token as
`Authorization: Bearer <token>`; everyone else sees the fingerprint and readiness.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ui.gateway import Gateway, RequestFailed


def build_ops_router(gateway: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:  # on the event loop: answers even when every thread is busy
        return {"status": "ok"}

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        internals = gateway.shows_internals(bearer_token(request))
        try:
            status = await anyio.to_thread.run_sync(gateway.status, internals,
                                                    limiter=gateway.status_slots)
        except RequestFailed as failure:
            return JSONResponse({"status": "not_ready", "reason": failure.message},
                                status_code=503)
        serving = [w for w in status.workers if w.role == "serving"]
        if status.model is None or not serving:
            reason = ("the model is loading" if any(w.role in ("starting", "loading", "warming")
                                                     for w in status.workers)
                      else "no worker is serving; see the supervisor's log")
            return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)
        body = {"status": "ready", "fingerprint": status.model.fingerprint,
                "workers": len(serving), "reloading": status.reloading}
        if internals:
            body["model_dir"] = status.model.model_dir
        return JSONResponse(body)

    @router.get("/metrics")
    async def metrics() -> Response:
        body = await anyio.to_thread.run_sync(gateway.metrics.render,
                                              limiter=gateway.status_slots)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router


def bearer_token(request: Request) -> str | None:
    """The admin token from `Authorization: Bearer <token>`, if sent."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
