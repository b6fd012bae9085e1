import os
from pathlib import Path

import pytest

from model_factory import DATA, DEMO_MODEL, write_hf, write_official

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite asserts exact transcripts of the 2.9 M-parameter demo model, whose near-ties a
# reduced type may flip, and auto picks int8 or bfloat16 depending on the CI machine's CPU:
# float32 unless a test asks for another type (tests/test_compute*.py, the batching service).
os.environ.setdefault("SENSEVOICE_COMPUTE_TYPE", "float32")


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


@pytest.fixture(scope="session")
def demo_model():
    """The embedded demo model (it really transcribes the example clips), loaded once through
    the front door: the cache, then its VAD on first use."""
    from sensevoice_core import load_model

    return load_model(DEMO_MODEL)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small random models side by side, for services to serve and reload: a, b and c (other
    weights, so other fingerprints) and broken (its weights cut in half). Their folder is the
    default allowed reload root of a service serving one of them."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_hf(root / name, seed=seed)
    broken = write_hf(root / "broken", seed=3)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    return root
