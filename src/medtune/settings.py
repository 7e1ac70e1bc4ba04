"""Machine settings: what belongs to a host rather than a recipe.

Read from environment variables (prefix `MEDTUNE_`, plus `HF_TOKEN`) and a `.env` file in the
current directory; `.env.example` lists them all. Command-line options override them.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEDTUNE_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8001
    model: str = "runs/aria/dpo"
    served_name: str = "aria-ft"
    api_key: str | None = None
    max_model_len: int = 4096
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    log_prompts: bool = Field(False, description="Log request and response bodies (off: medical data).")
    hf_token: str | None = Field(None, validation_alias=AliasChoices("HF_TOKEN", "MEDTUNE_HF_TOKEN"))
    hf_model_repo: str | None = None
    hf_dataset_repo: str | None = None


def get_settings() -> Settings:
    return Settings()
