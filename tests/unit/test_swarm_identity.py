"""Derived swarm identities (services/common/p2p/swarm_identity.py) and their users: the swarm image's entry
point (services/swarm/serve.py) and the inference service's INITIAL_PEERS."""

from __future__ import annotations

import asyncio
import stat

import pytest

from services.common.p2p import swarm_identity
from services.common.p2p.swarm_identity import IdentityError
from services.common.startup.config import ConfigError
from services.inference.settings import resolve_initial_peers
from services.swarm.serve import initial_peers, resolve_args, wait_for_a_peer

SEED = b"0123456789abcdef-a-test-seed"


def test_derivation_is_stable_and_label_specific():
    assert swarm_identity.peer_id(SEED, "smollm2") == swarm_identity.peer_id(SEED, "smollm2")
    assert swarm_identity.peer_id(SEED, "smollm2") != swarm_identity.peer_id(SEED, "tiny-bloom")
    assert swarm_identity.peer_id(SEED, "smollm2") != swarm_identity.peer_id(SEED + b"x", "smollm2")
    assert swarm_identity.peer_id(SEED, "smollm2").startswith("12D3KooW")  # an Ed25519 peer id
    data = swarm_identity.identity_file_bytes(SEED, "smollm2")
    assert data[:4] == bytes([0x08, 0x01, 0x12, 64]) and len(data) == 68


def test_p2pd_gets_the_peer_id_we_derive(tmp_path):
    """The real p2pd daemon (hivemind) started with the derived identity file announces our peer id, and a
    second daemon bootstraps from it through a /dns4 multiaddr with the derived peer id."""
    from hivemind.p2p import P2P

    identity = tmp_path / "identity"
    identity.write_bytes(swarm_identity.identity_file_bytes(SEED, "smollm2"))

    async def run() -> tuple[str, list]:
        server = await P2P.create(identity_path=str(identity), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            port = str((await server.get_visible_maddrs())[0]).split("/")[4]
            addr = swarm_identity.resolve_multiaddr(f"/dns4/localhost/tcp/{port}/p2p/derived:smollm2", SEED)
            client = await P2P.create(initial_peers=[addr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            try:
                return server.peer_id.to_base58(), [p.peer_id.to_base58() for p in await client.list_peers()]
            finally:
                await client.shutdown()
        finally:
            await server.shutdown()

    server_id, client_peers = asyncio.run(run())
    assert server_id == swarm_identity.peer_id(SEED, "smollm2")
    assert server_id in client_peers


def test_multiaddrs_and_seeds(tmp_path):
    plain = "/ip4/10.0.0.1/tcp/31337/p2p/QmPeer"
    assert swarm_identity.resolve_multiaddr(plain, None) == plain
    derived = "/dns4/swarm-0/tcp/31337/p2p/derived:m"
    assert swarm_identity.resolve_multiaddr(derived, SEED) == "/dns4/swarm-0/tcp/31337/p2p/" + swarm_identity.peer_id(
        SEED, "m"
    )
    with pytest.raises(IdentityError, match="SWARM_SEED_FILE"):
        swarm_identity.resolve_multiaddr(derived, None)
    with pytest.raises(IdentityError, match="must end the multiaddr"):
        swarm_identity.resolve_multiaddr("/dns4/derived:m/tcp/1", SEED)
    with pytest.raises(IdentityError, match="label"):
        swarm_identity.peer_id(SEED, "a b")
    short = tmp_path / "short"
    short.write_bytes(b"tiny\n")
    with pytest.raises(IdentityError, match="needs at least 16"):
        swarm_identity.read_seed(short)
    with pytest.raises(IdentityError, match="cannot read"):
        swarm_identity.read_seed(tmp_path / "missing")
    good = tmp_path / "seed"
    good.write_bytes(SEED + b"\n")
    assert swarm_identity.read_seed(good) == SEED


def test_serve_writes_the_identity_and_resolves_peers(tmp_path):
    seed_file = tmp_path / "seed"
    seed_file.write_bytes(SEED)
    args = ["/models/m", "--identity_path", "derived:m", "--new_swarm"]
    resolved = resolve_args(args, str(seed_file), tmp_path)
    identity = tmp_path / "petals-identity-m"
    assert resolved == ["/models/m", "--identity_path", str(identity), "--new_swarm"]
    assert identity.read_bytes() == swarm_identity.identity_file_bytes(SEED, "m")
    assert stat.S_IMODE(identity.stat().st_mode) == 0o400
    assert resolve_args(args, str(seed_file), tmp_path) == resolved  # a restart rewrites the read-only file
    joined = resolve_args(["--initial_peers", "/dns4/s/tcp/1/p2p/derived:m"], str(seed_file), tmp_path)
    assert joined == ["--initial_peers", "/dns4/s/tcp/1/p2p/" + swarm_identity.peer_id(SEED, "m")]
    plain = ["m", "--new_swarm", "--identity_path", "/tmp/identity"]
    assert resolve_args(plain, None, tmp_path) == plain
    with pytest.raises(IdentityError, match="SWARM_SEED_FILE"):
        resolve_args(args, None, tmp_path)


def test_inference_initial_peers(tmp_path):
    seed_file = tmp_path / "seed"
    seed_file.write_bytes(SEED)
    peers = ("/dns4/s/tcp/31337/p2p/derived:m", "/ip4/1.2.3.4/tcp/1/p2p/QmX")
    resolved = resolve_initial_peers(peers, str(seed_file))
    assert resolved == ("/dns4/s/tcp/31337/p2p/" + swarm_identity.peer_id(SEED, "m"), peers[1])
    assert resolve_initial_peers(peers[1:], "") == peers[1:]
    with pytest.raises(ConfigError, match=r"INITIAL_PEERS: .*SWARM_SEED_FILE"):
        resolve_initial_peers(peers, "")


def test_a_joining_server_waits_for_an_initial_peer():
    import socket

    args = ["m", "--initial_peers", "/dns4/localhost/tcp/1/p2p/Qm", "/ip4/127.0.0.1/tcp/2/p2p/Qm", "--x", "y"]
    assert initial_peers(args) == args[2:4]
    assert initial_peers(["m", "--new_swarm"]) == []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert wait_for_a_peer([f"/ip4/127.0.0.1/tcp/{port}/p2p/Qm"], 5) is True
    lines = []
    assert wait_for_a_peer([f"/ip4/127.0.0.1/tcp/{port}/p2p/Qm"], 0.5, lines.append) is False  # closed now
    assert "no initial peer answered" in lines[-1]
    assert wait_for_a_peer(["/unix/sock"], 0) is True  # nothing to wait for
