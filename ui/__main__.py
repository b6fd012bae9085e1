"""python -m ui: the Gradio page and HTTP API on SENSEVOICE_UI_HOST:SENSEVOICE_UI_PORT.

It talks to the supervisor (python -m supervisor) and holds no model; it can start before the
supervisor does (GET /ready says 503 until a worker serves).
Exit codes (sensevoice_core.exit_codes): 0 stopped, 1 could not start (port in use, host not
local), 2 invalid settings.
"""

from __future__ import annotations

import logging
import os
import sys

from sensevoice_core.exit_codes import EXIT_FAILED, EXIT_OK

logger = logging.getLogger("sensevoice.ui")
WS_FRAME_SLACK = 64 * 1024  # over the realtime limit: such a message still gets its error event


def main() -> int:
    # Gradio reads these at import; nothing here may reach for the network.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sensevoice_core.cli import bind_problem, settings_or_exit
    from sensevoice_core.logs import configure_logging
    from sensevoice_core.settings import Settings

    settings = settings_or_exit(check=Settings.client_address)
    configure_logging("ui", settings.log_level)
    problem = bind_problem(settings.ui_host, settings.ui_port, "SENSEVOICE_UI")
    if problem:
        logger.error("Cannot start: %s", problem)
        return EXIT_FAILED
    if not settings.ui_is_loopback():
        logger.warning("Listening on %s: transcription is open to that network; reloading %s",
                       settings.ui_host, "needs SENSEVOICE_ADMIN_TOKEN" if settings.admin_token
                       else "is off (set SENSEVOICE_ADMIN_TOKEN to allow it)")

    import uvicorn

    from sensevoice_core.client import ServiceError
    from ui.app import create_app
    from ui.realtime import MAX_MESSAGE_BYTES

    try:
        app = create_app(settings)
    except ServiceError as e:  # e.g. unreadable CURVE keys for a tcp:// supervisor
        logger.error("Cannot start: %s", e.message)
        return EXIT_FAILED
    host = f"[{settings.ui_host.strip('[]')}]" if ":" in settings.ui_host else settings.ui_host
    logger.info("Serving the UI on http://%s:%d (supervisor at %s)", host, settings.ui_port,
                settings.client_address())
    uvicorn.run(app, host=settings.ui_host.strip("[]"), port=settings.ui_port,
                log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                # uvicorn's default is 16 MiB: a connection could make it buffer that much
                # before the realtime session's own check sees the message.
                ws_max_size=MAX_MESSAGE_BYTES + WS_FRAME_SLACK)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
