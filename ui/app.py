"""The UI process's web app: HTTP endpoints first, the Gradio page mounted at /."""

from __future__ import annotations

import gradio as gr
from fastapi import FastAPI

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.protocol import ServiceStatus
from sensevoice_core.settings import Settings
from ui.blocks import CSS, EXAMPLES_DIR, build_blocks
from ui.gateway import Gateway
from ui.metrics import ServiceMetrics
from ui.openai_api import build_openai_router
from ui.ops import build_ops_router

SCRAPE_STATUS_TIMEOUT_S = 2.0


def create_app(settings: Settings, client: SupervisorClient | None = None) -> FastAPI:
    client = client or SupervisorClient(settings=settings)

    def scrape_status() -> ServiceStatus | None:
        try:
            return client.status(timeout=SCRAPE_STATUS_TIMEOUT_S)
        except ServiceError:
            return None

    gateway = Gateway(settings, client, ServiceMetrics(scrape_status))
    app = FastAPI(title="SenseVoice Serve", docs_url="/docs", redoc_url=None)
    app.include_router(build_ops_router(gateway))
    app.include_router(build_openai_router(gateway))
    return gr.mount_gradio_app(
        app, build_blocks(gateway), path="/", server_name=settings.ui_host,
        server_port=settings.ui_port, allowed_paths=[str(EXAMPLES_DIR)],
        max_file_size=int(settings.max_upload_mb * 1024 * 1024), footer_links=["api"],
        ssr_mode=False, css=CSS,
        show_error=False)  # gr.Error sentences still show; an unexpected exception's text does not
