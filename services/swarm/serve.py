"""Entry point of the swarm image: a Petals server whose identity and peers may be derived.

``python -m services.swarm.serve <petals.cli.run_server arguments>`` runs
``python -m petals.cli.run_server`` with the same arguments (exec: the server is the container's
PID 1 and gets its SIGTERM), after resolving the ``derived:`` syntax of
services/common/swarm_identity.py against the seed in SWARM_SEED_FILE:

- ``--identity_path derived:<label>``: the label's private key is written to a file under
  TMPDIR (default /tmp, an emptyDir in the chart), mode 0400, and that file is passed instead;
- ``--initial_peers ... /p2p/derived:<label>``: the label's peer id replaces ``derived:<label>``.

This is how the chart's private swarm bootstraps with no hand-copied multiaddr: server 0 of each
model runs with the identity ``derived:<model>``, and the other servers and the inference
replicas name it as ``/dns4/<server 0's DNS name>/tcp/31337/p2p/derived:<model>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from services.common.swarm_identity import DERIVED, IdentityError, identity_file_bytes, read_seed, resolve_multiaddr

SEED_ENV = "SWARM_SEED_FILE"


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


def main(argv: list[str]) -> int:
    try:
        args = resolve_args(argv, os.environ.get(SEED_ENV), Path(tempfile.gettempdir()))
    except IdentityError as error:
        print(f"serve: {error}", file=sys.stderr, flush=True)
        return 2
    command = [sys.executable, "-m", "petals.cli.run_server", *args]
    print("serve: exec", " ".join(command), file=sys.stderr, flush=True)
    os.execv(sys.executable, command)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
