"""Shared fixtures: small real checkpoints built once per session, real Chroma in tmp folders."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import CallToolResult
from PIL import Image

from cliplens.server.app import build_server
from cliplens.server.config import Settings
from cliplens.server.tinymodel import build_tiny_model

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (230, 210, 30)}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-clip"), kind="clip", seed=0)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-siglip"), kind="siglip", seed=0)


def make_image(path: Path, colour: str | tuple[int, int, int] = "red", size: tuple[int, int] = (48, 40)) -> Path:
    rgb = COLOURS.get(colour, colour) if isinstance(colour, str) else colour
    img = Image.new("RGB", size, rgb)
    # A second shape so images of one colour still differ a little.
    img.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """An allowed folder with four colour images, one in a subfolder."""
    root = tmp_path / "photos"
    make_image(root / "red.png", "red")
    make_image(root / "green.jpg", "green")
    make_image(root / "blue.png", "blue")
    make_image(root / "sub" / "yellow.png", "yellow")
    return root


@pytest.fixture
def settings(tiny_clip: Path, tmp_path: Path, photos: Path) -> Settings:
    # fp32: these tests check numbers against fp32 references; test_pipeline covers bf16 and int8.
    return Settings(model=str(tiny_clip), device="cpu", precision="fp32", db_dir=tmp_path / "db", allow=[photos])


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[Client]:
    """An in-memory MCP session with a fresh server.

    A context manager rather than an async fixture: the SDK's task groups must be entered
    and left in the same task, which pytest-asyncio fixtures do not guarantee.
    """
    async with Client(build_server(settings)) as client:
        yield client


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    # The text block carries the same JSON, for clients that ignore structured content.
    first = result.content[0]
    assert first.type == "text" and json.loads(first.text) == result.structured_content
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result.structured_content
    return " ".join(getattr(block, "text", "") for block in result.content)
