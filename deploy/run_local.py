"""``make run``: the whole stack on this machine, on the embedded default model.

Builds the offline tiny BLOOM (cached), starts a private Petals swarm on loopback, the
inference replicas and the gateway, prints the URLs, and runs in the foreground until Ctrl-C
(or SIGTERM), then stops everything it started. Settings (environment): PUBLIC_PORT (5000;
the ui service listens on PUBLIC_PORT+9 and
inference replicas on PUBLIC_PORT+10, +11, ...), INFERENCE_REPLICAS_LOCAL (2),
LOCAL_SWARM_BLOCKS ("0:2 2:4": one block range per Petals server), LOCAL_STATE_DIR
(.cache/local: logs, identities).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from deploy.local_stack import DEFAULT_STATE_DIR, LocalStack, StartupError
from services.common.config import Env, load_or_exit


def _settings() -> tuple[int, int, tuple[str, ...], Path]:
    env = Env()
    port = env.int("PUBLIC_PORT", 5000, minimum=1, maximum=65000)
    replicas = env.int("INFERENCE_REPLICAS_LOCAL", 2, minimum=1, maximum=8)
    blocks = env.list("LOCAL_SWARM_BLOCKS", ("0:2", "2:4"))
    state_dir = Path(env.str("LOCAL_STATE_DIR", str(DEFAULT_STATE_DIR)))
    return port, replicas, blocks, state_dir


def main() -> int:
    port, replicas, blocks, state_dir = load_or_exit(_settings, "run_local")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly like Ctrl-C
    stack = LocalStack(public_port=port, block_ranges=blocks, inference_replicas=replicas, state_dir=state_dir)
    print(f"Starting a private Petals swarm ({len(blocks)} servers) and the services; logs in {state_dir}", flush=True)
    try:
        stack.start()
        url = stack.public_url
        print(
            f"\nPetals Chat is up.\n  Chat:    {url}/\n"
            f"  API:     {url}/api/v1/  (OpenAPI: {url}/api/openapi.json)\n"
            f"  Metrics: {url}/metrics (gateway), "
            f"{', '.join(s.base_url + '/metrics' for s in stack.services if s.name.startswith('inference'))}\n"
            f"  Swarm:   {' '.join(stack.swarm.initial_peers)}\n"
            f"Try:\n  curl -s -X POST '{url}/api/v1/generate' -d 'inputs=A cat sat on' -d 'max_new_tokens=8'\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        signal.pause()
    except StartupError as error:
        print(f"run_local: start-up failed: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        print("Stopping...", flush=True)
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
