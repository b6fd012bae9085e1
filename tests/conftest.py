import os
from pathlib import Path

import pytest

from model_factory import DATA, write_hf, write_official

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test and subprocess caches under a temporary directory, never the repo's cache/."""
    cache_dir = tmp_path_factory.mktemp("cache")
    os.environ["SENSEVOICE_CACHE_DIR"] = str(cache_dir)
    os.environ.pop("SENSEVOICE_MODEL_DIR", None)
    return cache_dir


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """Kill services and UIs that a failed test never stopped (their workers die with them)."""
    yield
    from service import STARTED

    for process in STARTED:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_official(tmp_path_factory.mktemp("models") / "official")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf(tmp_path_factory.mktemp("models") / "hf")
