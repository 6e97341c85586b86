"""`cliplens serve` as a real subprocess over stdio: the SDK client, raw JSON-RPC on the wire,
and two processes sharing one embedded store."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from cliplens.tools import TOOL_MODULES

from .conftest import structured

TOOLS = set(TOOL_MODULES)
TIMEOUT = 60  # seconds, for every subprocess and every wait
PROTOCOL_VERSION = "2025-06-18"  # a handshake-era version: `initialize` is how the session starts


def cliplens_command() -> list[str]:
    """The installed `cliplens` script next to this interpreter, or `python -m` as a fallback."""
    script = Path(sys.executable).with_name("cliplens")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cliplens.server.cli"]


def isolated_env(tmp: Path) -> dict[str, str]:
    """The environment of a first run on a fresh account: empty caches and data folders in `tmp`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPLENS_", "HF_", "TRANSFORMERS_"))}
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        HF_HOME=str(tmp / "hf-home"),  # cold: nothing cached yet
        HF_HUB_OFFLINE="1",  # tests may use loopback only
        XDG_CACHE_HOME=str(tmp / "xdg-cache"),
        XDG_DATA_HOME=str(tmp / "xdg-data"),
        PYTHONUNBUFFERED="1",
    )
    return env


def serve_args(model: Path, db: Path, allow: Path, *extra: str) -> list[str]:
    return ["serve", "--model", str(model), "--db", str(db), "--allow", str(allow), "--device", "cpu", *extra]


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*cliplens_command(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return finish(start_cli(args, env))


class RawServer:
    """A server subprocess driven with newline-delimited JSON-RPC; every stdout line is kept."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*cliplens_command(), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
        )
        self.lines: list[str] = []
        self._stdout: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._stdout.put), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr.append), daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._next_id = 0

    @staticmethod
    def _pump(stream: IO[str] | None, sink: Any) -> None:
        assert stream is not None
        for line in stream:
            sink(line)
        sink(None)

    @property
    def stderr(self) -> str:
        return "".join(s for s in self._stderr if s)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send a request and read stdout until its response; returns that response."""
        self._next_id += 1
        rid = self._next_id
        self.send({"id": rid, "method": method, "params": params})
        while True:
            try:
                line = self._stdout.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no response to {method} in {TIMEOUT}s; stderr:\n{self.stderr}") from None
            if line is None:
                raise AssertionError(f"server exited ({self.proc.poll()}) before answering {method}:\n{self.stderr}")
            self.lines.append(line)
            message = json.loads(line)
            if message.get("id") == rid and ("result" in message or "error" in message):
                return message

    def initialize(self) -> dict[str, Any]:
        response = self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "cliplens-tests", "version": "0"},
            },
        )
        self.send({"method": "notifications/initialized"})
        return response

    def call_tool(self, name: str, arguments: dict[str, Any], progress_token: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"name": name, "arguments": arguments}
        if progress_token is not None:
            params["_meta"] = {"progressToken": progress_token}
        return self.request("tools/call", params)

    def close(self) -> int:
        """Close stdin (the client went away), wait for exit, and collect what stdout still had."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
            raise
        for t in self._threads:
            t.join(timeout=TIMEOUT)
        while not self._stdout.empty():
            line = self._stdout.get_nowait()
            if line is not None:
                self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)


async def test_sdk_client_over_stdio_lists_tools_indexes_and_searches(
    tiny_clip: Path, photos: Path, tmp_path: Path
) -> None:
    params = StdioServerParameters(
        command=cliplens_command()[0],
        args=[*cliplens_command()[1:], *serve_args(tiny_clip, tmp_path / "db", photos)],
        env=isolated_env(tmp_path),
    )
    with (tmp_path / "server-stderr.txt").open("w") as errlog, anyio.fail_after(TIMEOUT):
        async with Client(stdio_client(params, errlog=errlog)) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert tools == TOOLS

            out = structured(await client.call_tool("index_folder", {"path": str(photos)}))
            assert (out["scanned"], out["added"], out["skipped_count"]) == (4, 4, 0)
            assert out["store_total"] == 4 and out["device"] == "cpu"

            result = await client.call_tool("search_images", {"query": "a red square", "top_k": 3, "cutoff": "none"})
            found = structured(result)
            assert [h["rank"] for h in found["hits"]] == [1, 2, 3]
            assert all(Path(h["path"]).is_relative_to(photos) for h in found["hits"])
            scores = [h["score"] for h in found["hits"]]
            assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
            # Three JPEG thumbnails and the PNG contact sheet.
            assert [b.mime_type for b in result.content if b.type == "image"] == ["image/jpeg"] * 3 + ["image/png"]

            # A path outside --allow is refused by the real process too.
            refused = await client.call_tool("index_folder", {"path": str(tmp_path)})
            assert refused.is_error


def test_stdout_carries_only_json_rpc_from_a_cold_start(tiny_clip: Path, photos: Path, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    assert not Path(env["HF_HOME"]).exists()
    # -v: INFO logs too, so that there is chatter that must go to stderr.
    server = RawServer(serve_args(tiny_clip, tmp_path / "db", photos, "-v"), env)
    try:
        init = server.initialize()
        assert init["result"]["protocolVersion"] == PROTOCOL_VERSION
        assert init["result"]["serverInfo"]["name"] == "cliplens"
        response = server.call_tool("index_folder", {"path": str(photos)}, progress_token="tok")
        assert response["result"]["isError"] is False, response
        assert response["result"]["structuredContent"]["added"] == 4
        listed = server.request("tools/list", {})
        assert {t["name"] for t in listed["result"]["tools"]} == TOOLS
        code = server.close()
    finally:
        server.kill()
    assert code == 0, server.stderr

    assert server.lines
    for line in server.lines:
        assert line.endswith("\n")
        message = json.loads(line)  # a log line or progress bar here would fail to parse
        assert isinstance(message, dict) and message.get("jsonrpc") == "2.0", line
    progress = [json.loads(x)["params"] for x in server.lines if '"notifications/progress"' in x]
    assert progress and progress[-1]["progressToken"] == "tok"
    assert progress[-1]["progress"] == progress[-1]["total"] == 4
    # The chatter exists, and it went to stderr.
    assert "loaded" in server.stderr and "INFO" in server.stderr


def test_second_process_is_read_only_while_the_first_holds_the_store(
    tiny_clip: Path, photos: Path, tmp_path: Path
) -> None:
    env = isolated_env(tmp_path)
    db = tmp_path / "db"
    common = ["--db", str(db), "--model", str(tiny_clip), "--allow", str(photos), "--device", "cpu"]
    a = RawServer(serve_args(tiny_clip, db, photos), env)
    try:
        a.initialize()  # answered only once the lifespan has opened the engine and taken the lock
        indexed = a.call_tool("index_folder", {"path": str(photos)})
        assert indexed["result"]["structuredContent"]["added"] == 4
        assert (db / "cliplens.lock").read_text().strip() == str(a.proc.pid)

        # Two more processes at once (both only read while A holds the lock); this also saves time.
        b_index_proc = start_cli(["index", str(photos), *common], env)
        b_search_proc = start_cli(["search", "a red square", "--cutoff", "none", "--json", *common], env)
        b_index, b_search = finish(b_index_proc), finish(b_search_proc)

        assert b_index.returncode == 2, b_index
        assert "locked by another cliplens process" in b_index.stderr
        assert f"pid {a.proc.pid}" in b_index.stderr
        assert b_index.stdout == ""

        assert b_search.returncode == 0, b_search.stderr
        hits = json.loads(b_search.stdout)["hits"]
        assert len(hits) == 4 and {Path(h["path"]).name for h in hits} >= {"red.png", "blue.png"}

        assert a.close() == 0, a.stderr
    finally:
        a.kill()

    b_again = run_cli(["index", str(photos), "--json", *common], env)
    assert b_again.returncode == 0, b_again.stderr
    out = json.loads(b_again.stdout)
    assert (out["scanned"], out["added"], out["unchanged"], out["store_total"]) == (4, 0, 4, 4)


def test_a_server_that_cannot_load_its_model_exits_2_with_the_reason(photos: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    server = RawServer(serve_args(missing, tmp_path / "db", photos), isolated_env(tmp_path))
    try:
        code = server.close()
    finally:
        server.kill()
    assert code == 2, server.stderr
    assert f"cliplens: error: could not load model '{missing}'" in server.stderr
    assert "Traceback" not in server.stderr  # one clear message, not an exception-group dump
    assert server.lines == []
