"""Entry point of the swarm image: a Petals server whose identity and peers may be derived.

``python -m services.swarm.serve <petals.cli.run_server arguments>`` runs Petals'
``petals.cli.run_server`` in this process with the same arguments, after resolving the
``derived:`` syntax of services/common/p2p/swarm_identity.py against the seed in SWARM_SEED_FILE:

- ``--identity_path derived:<label>``: the label's private key is written to a file under
  TMPDIR (default /tmp, an emptyDir in the chart), mode 0400, and that file is passed instead;
- ``--initial_peers ... /p2p/derived:<label>``: the label's peer id replaces ``derived:<label>``.

This is how the chart's private swarm bootstraps with no hand-copied multiaddr: server 0 of each
model runs with the identity ``derived:<model>``, and the other servers and the inference
replicas name it as ``/dns4/<server 0's DNS name>/tcp/31337/p2p/derived:<model>``.

A server that joins (``--initial_peers``) first waits until one of its peers accepts TCP
connections (at most SWARM_BOOTSTRAP_WAIT_SECONDS, default 600): Petals exits when it reaches no
initial peer, and pods start in any order (server 0 loads its blocks meanwhile).

Without ``--num_handlers``, the server runs one connection-handler process per CPU this process may
use (its affinity and cgroup quota), at most Petals' default of 8: a server run by hand in a
container of 2 CPUs runs 2, not 8 (services/swarm/launcher.py, ``handlers_per_server``).

bitsandbytes, which Petals' blocks import, loads without its triton path where the installed triton
has no ``triton.ops`` (services/swarm/bitsandbytes_triton.py: the CUDA torch's triton 3).

Tensors of at most SWARM_SMALL_TENSOR_BYTES (default 1 MiB; 0 keeps torch's shared memory) cross
the server's processes by value (services/swarm/small_tensors.py).

With SWARM_BATCHING=true (the default), concurrent one-token decoding steps of different sessions
run as one forward pass over the server's Llama or BLOOM blocks (services/swarm/batching_pool.py), and the
runtime takes tasks only when it is free (``--prefetch_batches 0`` unless given); its passes' sizes,
queue waits and steps by path are served on SWARM_METRICS_PORT (0, the default: not served;
services/swarm/batching_metrics.py).

The patches are installed by services/swarm/patches.py, which checks that they fit the installed
libraries first: one that does not stops the server with one line (docs/patches.md).

SIGTERM shuts the server down gracefully, as Ctrl-C does (it announces its blocks offline, stops
its handlers and its DHT). Petals installs no SIGTERM handler, and the container's PID 1 ignores a
signal it has no handler for: without this, every stop waited for the grace period's SIGKILL.
"""

from __future__ import annotations

import os
import re
import runpy
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from services.common.p2p.swarm_identity import DERIVED, IdentityError, identity_file_bytes, read_seed, resolve_multiaddr
from services.common.startup.config import ConfigError, Env
from services.common.startup.patching import PatchError
from services.swarm import batching_metrics, batching_pool, patches, small_tensors
from services.swarm.launcher import handlers_per_server

SEED_ENV = "SWARM_SEED_FILE"
WAIT_ENV = "SWARM_BOOTSTRAP_WAIT_SECONDS"
_TCP_ADDR = re.compile(r"^/(?:ip4|ip6|dns|dns4|dns6)/(?P<host>[^/]+)/tcp/(?P<port>\d+)(?:/|$)")


def resolve_args(args: list[str], seed_file: str | None, identity_dir: Path) -> list[str]:
    """``args`` with every derived identity written to ``identity_dir`` and every derived peer resolved."""
    needs_seed = any(DERIVED in arg for arg in args)
    if not needs_seed:
        return list(args)
    if not seed_file:
        raise IdentityError(f"the arguments use {DERIVED}<label>: set {SEED_ENV} to the swarm's seed file")
    seed = read_seed(seed_file)
    resolved: list[str] = []
    previous = None
    for arg in args:
        if previous == "--identity_path" and arg.startswith(DERIVED):
            label = arg.removeprefix(DERIVED)
            path = identity_dir / f"petals-identity-{label}"
            data = identity_file_bytes(seed, label)
            if path.exists():
                path.chmod(0o600)
            path.write_bytes(data)
            path.chmod(0o400)
            arg = str(path)
        elif DERIVED in arg:
            arg = resolve_multiaddr(arg, seed)
        resolved.append(arg)
        previous = arg
    return resolved


def with_sized_handlers(args: list[str], cpus: int | None = None) -> list[str]:
    """``args``, with ``--num_handlers`` for the CPUs this process gets added unless it is there."""
    if any(arg == "--num_handlers" or arg.startswith("--num_handlers=") for arg in args):
        return list(args)
    return [*args, "--num_handlers", str(handlers_per_server(1, cpus))]


def initial_peers(args: list[str]) -> list[str]:
    """The values of ``--initial_peers`` (it takes every following argument up to the next flag)."""
    if "--initial_peers" not in args:
        return []
    peers = []
    for arg in args[args.index("--initial_peers") + 1 :]:
        if arg.startswith("--"):
            break
        peers.append(arg)
    return peers


def wait_for_a_peer(peers: list[str], timeout_s: float, log=print) -> bool:
    """Wait until one of ``peers`` (multiaddrs) accepts a TCP connection; False after ``timeout_s``."""
    addresses = [(m["host"], int(m["port"])) for m in map(_TCP_ADDR.match, peers) if m]
    if not addresses:
        return True
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        for address in addresses:
            try:
                with socket.create_connection(address, timeout=2):
                    return True
            except OSError:
                pass
        if time.monotonic() >= deadline:
            log(f"serve: no initial peer answered in {timeout_s:.0f} s; starting anyway")
            return False
        if not announced:
            log(f"serve: waiting for an initial peer: {', '.join(f'{h}:{p}' for h, p in addresses)}")
            announced = True
        time.sleep(2)


def main(argv: list[str]) -> int:
    try:
        args = with_sized_handlers(resolve_args(argv, os.environ.get(SEED_ENV), Path(tempfile.gettempdir())))
        wait_s = Env().float(WAIT_ENV, 600.0, minimum=0)
        small_tensor_bytes = Env().int(small_tensors.LIMIT_ENV, small_tensors.DEFAULT_LIMIT_BYTES, minimum=0)
        batching = Env().bool(batching_pool.ENV, True)
        metrics_port = Env().int(batching_metrics.PORT_ENV, 0, minimum=0, maximum=65535)
        if batching:
            args = batching_pool.runtime_args(args)
        # before the wait for a peer: a patch that does not fit stops it at once
        patches.install(small_tensor_bytes, batching)
        if batching:
            batching_metrics.serve(metrics_port)
    except (IdentityError, ConfigError, PatchError, OSError) as error:
        print(f"serve: {error}", file=sys.stderr, flush=True)
        return 2
    wait_for_a_peer(initial_peers(args), wait_s, lambda line: print(line, file=sys.stderr, flush=True))
    print("serve: petals.cli.run_server", " ".join(args), file=sys.stderr, flush=True)
    graceful_sigterm()
    sys.argv = ["petals.cli.run_server", *args]
    runpy.run_module("petals.cli.run_server", run_name="__main__", alter_sys=True)
    return 0


def graceful_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in this process (Petals' graceful shutdown); its forks die as usual."""
    main_pid = os.getpid()

    def on_sigterm(signum, frame):
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
