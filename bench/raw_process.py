"""The raw Petals client in a process of its own: the benchmarks' fair baseline.

A user of the bare library runs the Petals client in a process with nothing else in it; the
benchmarks' own HTTP clients and bookkeeping must not share its interpreter (its GIL, its torch
threads). ``RawProcess`` starts ``python -m bench.raw_process CLASS MODEL_DIR PEER...``, which
builds ``CLASS(model_dir, peers)`` and then answers method calls sent as JSON lines
(``{"method": ..., "args": [...]}`` -> ``{"result": ...}`` or ``{"error": ...}``); the proxy's
attributes are those methods (``raw.per_token_calls(32)``). torch in the
child keeps its own defaults (one intra-op thread per usable core), as the bare library has them.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

_READY = "ready"


class RawProcess:
    """A proxy to a raw client object living in a child process; ``call`` runs one of its methods."""

    def __init__(self, client_class: str, model_dir: Path, peers: list[str], stderr_path: Path) -> None:
        self._stderr = open(stderr_path, "ab")  # noqa: SIM115 - the child writes its log there until close()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.raw_process", client_class, str(model_dir), *peers],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if self._process.stdout.readline().strip() != _READY:
            self.close()
            raise RuntimeError(f"the raw client process failed to start; see {stderr_path}")

    @property
    def pid(self) -> int:
        return self._process.pid

    def __getattr__(self, method: str) -> Any:
        return lambda *args: self.call(method, *args)

    def call(self, method: str, *args: Any) -> Any:
        """Run ``method(*args)`` in the child and return its JSON result."""
        self._process.stdin.write(json.dumps({"method": method, "args": args}) + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the raw client process exited ({self._process.poll()})")
        reply = json.loads(answer)
        if "error" in reply:
            raise RuntimeError(f"raw client {method}: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        """Let the child leave the swarm and exit; kill it if it does not."""
        try:
            self._process.communicate(json.dumps({"method": "close", "args": []}) + "\n", timeout=30)
        except (subprocess.TimeoutExpired, BrokenPipeError, ValueError):
            self._process.kill()
            self._process.wait()
        self._stderr.close()


def _serve(client: Any, channel: Any) -> None:
    """Answer method calls from stdin until ``close``."""
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = getattr(client, request["method"])(*request["args"])
            reply = {"result": result}
        except Exception as error:
            traceback.print_exc()
            reply = {"error": f"{type(error).__name__}: {error}"}
        channel.write(json.dumps(reply) + "\n")
        channel.flush()
        if request["method"] == "close":
            return


def main() -> None:
    """Child side: stdout becomes the reply channel, every print and log goes to stderr."""
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    class_path, model_dir, *peers = sys.argv[1:]
    module, _, name = class_path.partition(":")
    client = getattr(importlib.import_module(module), name)(Path(model_dir), peers)
    channel.write(_READY + "\n")
    channel.flush()
    _serve(client, channel)


if __name__ == "__main__":
    main()
