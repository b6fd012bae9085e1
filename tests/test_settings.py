"""SENSEVOICE_* environment variables become typed settings, with clear errors."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from sensevoice_core import Settings


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("SENSEVOICE_MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("SENSEVOICE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("SENSEVOICE_DISABLE_CACHE", "true")
    monkeypatch.setenv("SENSEVOICE_KEEP_SNAPSHOTS", "5")
    settings = Settings()
    assert settings.model_dir == tmp_path / "m" and settings.cache_dir == tmp_path / "c"
    assert settings.disable_cache is True and settings.keep_snapshots == 5


def test_an_empty_model_dir_means_unset(monkeypatch):
    monkeypatch.setenv("SENSEVOICE_MODEL_DIR", "  ")
    assert Settings().model_dir is None


def test_defaults_are_safe(monkeypatch):
    for name in ("SENSEVOICE_CACHE_DIR", "SENSEVOICE_MODEL_DIR", "SENSEVOICE_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.cache_dir == Path("cache") and settings.device == "cpu"
    assert settings.disable_cache is False and settings.model_dir is None


@pytest.mark.parametrize("name, value", [("SENSEVOICE_KEEP_SNAPSHOTS", "0"),
                                         ("SENSEVOICE_DISABLE_CACHE", "maybe"),
                                         ("SENSEVOICE_THREADS", "-1")])
def test_bad_values_name_the_field(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    field = name.removeprefix("SENSEVOICE_").lower()
    with pytest.raises(ValidationError, match=field):
        Settings()
