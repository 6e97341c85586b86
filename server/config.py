"""Settings shared by the MCP server and the CLI, from flags and CLIPLENS_* variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

from .encoder import DEFAULT_MODEL, DEVICES, PRECISIONS
from .paths import ALLOW_ENV as ENV_ALLOW


def default_db_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("cliplens", appauthor=False)) / "store"


# MCP clients give up on a silent call after a minute or so; progress keeps most of them
# waiting, but an unbounded call still ties up a client. Background jobs have no limit.
DEFAULT_CALL_TIMEOUT = 900.0


class Settings(BaseModel):
    model: str = Field(default=DEFAULT_MODEL, description="Hub id or local folder of a CLIP-family checkpoint")
    device: str = Field(default="auto", description=f"One of {', '.join(DEVICES)}")
    precision: str = Field(
        default="auto",
        description=f"One of {', '.join(PRECISIONS)}: auto is fp16 on CUDA, bf16 on CPUs with native bf16, else fp32",
    )
    db_dir: Path | None = Field(default=None, description="Embedded Chroma folder; None means the user data folder")
    chroma_url: str | None = Field(default=None, description="A Chroma server URL instead of the embedded store")
    allow: list[Path] = Field(default_factory=list, description="Folders the server may read")
    thumbnails: bool = Field(default=True, description="Attach JPEG thumbnails to search results")
    call_timeout: float = Field(
        default=DEFAULT_CALL_TIMEOUT,
        gt=0,
        le=24 * 3600,
        description="Seconds a foreground index_folder call may run; it then stops between batches, keeping them",
    )

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Environment first, then the given overrides (flags), skipping overrides that are None."""
        env: dict[str, object] = {}
        if model := os.environ.get("CLIPLENS_MODEL"):
            env["model"] = model
        if device := os.environ.get("CLIPLENS_DEVICE"):
            env["device"] = device
        if precision := os.environ.get("CLIPLENS_PRECISION"):
            env["precision"] = precision
        if db := os.environ.get("CLIPLENS_DB"):
            env["db_dir"] = Path(db)
        if timeout := os.environ.get("CLIPLENS_CALL_TIMEOUT"):
            env["call_timeout"] = timeout
        if url := os.environ.get("CLIPLENS_CHROMA_URL"):
            env["chroma_url"] = url
        if allow := os.environ.get(ENV_ALLOW):
            env["allow"] = [Path(p) for p in allow.split(os.pathsep) if p]
        env.update({k: v for k, v in overrides.items() if v is not None and v != []})
        return cls.model_validate(env)

    def store_dir(self) -> Path:
        return (self.db_dir or default_db_dir()).expanduser()
