"""Settings from SENSEVOICE_* environment variables. Construct once per process, pass it down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SENSEVOICE_", extra="ignore",
                                      protected_namespaces=())

    model_dir: Path | None = Field(
        None, description="model directory; unset: search ./model and the usual places")
    cache_dir: Path = Field(Path("cache"), description="where L2 snapshots and L3 live")
    disable_cache: bool = Field(False, description="bypass the L2 snapshot entirely")
    keep_snapshots: int = Field(2, ge=1, description="L2 snapshots kept; older ones are deleted")
    device: str = Field("cpu", description="torch device for inference")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default")

    @field_validator("model_dir", mode="before")
    @classmethod
    def _empty_means_unset(cls, value: object) -> object:
        """SENSEVOICE_MODEL_DIR= (empty) is unset, not the current directory."""
        return None if isinstance(value, str) and not value.strip() else value
