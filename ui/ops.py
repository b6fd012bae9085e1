"""GET /health (this process is up), GET /ready (a worker is serving), GET /metrics (Prometheus)."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ui.gateway import Gateway, RequestFailed


def build_ops_router(gateway: Gateway) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:  # on the event loop: answers even when every thread is busy
        return {"status": "ok"}

    @router.get("/ready")
    async def ready() -> JSONResponse:
        try:
            status = await anyio.to_thread.run_sync(gateway.status,
                                                    limiter=gateway.status_slots)
        except RequestFailed as failure:
            return JSONResponse({"status": "not_ready", "reason": failure.message},
                                status_code=503)
        serving = [w for w in status.workers if w.role == "serving"]
        if status.model is None or not serving:
            reason = ("the model is loading" if any(w.role in ("starting", "loading")
                                                     for w in status.workers)
                      else "no worker is serving; see the supervisor's log")
            return JSONResponse({"status": "not_ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready", "model_dir": status.model.model_dir,
                             "fingerprint": status.model.fingerprint,
                             "workers": len(serving), "reloading": status.reloading})

    @router.get("/metrics")
    async def metrics() -> Response:
        body = await anyio.to_thread.run_sync(gateway.metrics.render,
                                              limiter=gateway.status_slots)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
