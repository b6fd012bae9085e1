"""The UI process's web app: HTTP endpoints first, the Gradio page mounted at /."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from gradio.utils import get_upload_folder

from sensevoice_core.client import ServiceError, SupervisorClient
from sensevoice_core.protocol import ServiceStatus
from sensevoice_core.settings import Settings
from ui.blocks import CSS, build_blocks
from ui.downloads import SubtitleFiles
from ui.gateway import FrontDoor, Gateway
from ui.gradio_guard import TRANSCRIBE_API, GradioGuard, queued_transcriptions
from ui.metrics import SCRAPE_STATUS_TIMEOUT_S, ServiceMetrics
from ui.openai_api import build_openai_router
from ui.ops import build_ops_router
from ui.realtime import build_realtime_router
from ui.uploads import EXAMPLES_DIR



def front_door_capacity(settings: Settings) -> int:
    """What the supervisor can hold: its queue, plus one request per worker (a worker takes a
    second only beside a long one, so that is not counted on)."""
    return settings.max_queue + settings.workers


def create_app(settings: Settings, client: SupervisorClient | None = None) -> FastAPI:
    client = client or SupervisorClient(settings=settings)

    def scrape_status() -> ServiceStatus | None:
        try:
            return client.status(timeout=SCRAPE_STATUS_TIMEOUT_S)
        except ServiceError:
            return None

    door = FrontDoor(front_door_capacity(settings))
    gateway = Gateway(settings, client, ServiceMetrics(scrape_status, door.held, door.capacity),
                      door)
    subtitles = SubtitleFiles(Path(get_upload_folder()))
    subtitles.open()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            subtitles.close()

    # No /docs: Swagger UI loads its assets from a CDN, and nothing here may reach the network.
    app = FastAPI(title="SenseVoice Serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.include_router(build_ops_router(gateway))
    app.include_router(build_openai_router(gateway))
    app.include_router(build_realtime_router(gateway))
    page = build_blocks(gateway, subtitles)
    door.count_also(queued_transcriptions(page))
    [transcribe_fn] = [fn for fn in page.fns.values() if fn.api_name == TRANSCRIBE_API]
    app.add_middleware(GradioGuard, gateway=gateway, transcribe_fn_index=transcribe_fn._id)
    return gr.mount_gradio_app(
        app, page, path="/", server_name=settings.ui_host,
        server_port=settings.ui_port, allowed_paths=[str(EXAMPLES_DIR)],
        # Gradio's own refusal of a larger upload, before it stores the file (any caller may
        # upload without transcribing); Gateway.check_upload checks what is transcribed.
        max_file_size=settings.max_upload_bytes, footer_links=["api"],
        ssr_mode=False, css=CSS,
        show_error=False)  # gr.Error sentences still show; an unexpected exception's text does not
