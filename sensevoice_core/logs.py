"""One logging setup for every process, so each line says which process wrote it."""

from __future__ import annotations

import logging
import os


def configure_logging(process: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s [{process} pid {os.getpid()}] %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
