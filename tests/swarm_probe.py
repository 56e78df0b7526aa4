"""Ask every Petals server of a swarm how many attention-cache tokens it has free, right now.

Each server answers ``rpc_info`` with ``cache_tokens_available`` (its memory cache's free bytes
over the bytes one token takes in one block), computed on the spot; the figure servers publish
in the DHT is refreshed only every few minutes. A server holding no inference session answers
its full cache. Runs in its own process (it needs a hivemind DHT node and a p2p daemon, which
the test process is better without): one JSON line ``{peer id: tokens}`` per line read on stdin.

``python -m tests.swarm_probe --initial-peers ADDR... --dht-prefix PREFIX --blocks 4``
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--dht-prefix", required=True)
    parser.add_argument("--blocks", type=int, required=True, help="blocks of the model")
    args = parser.parse_args(argv)

    import hivemind
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.proto import runtime_pb2
    from hivemind.utils import MSGPackSerializer
    from petals.server.handler import CACHE_TOKENS_AVAILABLE, TransformerConnectionHandler
    from petals.utils.dht import get_remote_module_infos

    dht = hivemind.DHT(initial_peers=args.initial_peers, client_mode=True, start=True)
    try:
        p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        uids = [f"{args.dht_prefix}.{index}" for index in range(args.blocks)]

        def probe() -> dict[str, int]:
            infos = get_remote_module_infos(dht, uids, latest=True)
            peers = {peer for info in infos if info is not None for peer in info.servers}
            free = {}
            for peer in sorted(peers, key=str):
                stub = TransformerConnectionHandler.get_stub(p2p, peer)
                answer = RemoteExpertWorker.run_coroutine(stub.rpc_info(runtime_pb2.ExpertUID(uid=""), timeout=30))
                free[peer.to_base58()] = MSGPackSerializer.loads(answer.serialized_info)[CACHE_TOKENS_AVAILABLE]
            return free

        print(json.dumps({"ready": True}), flush=True)
        for _ in sys.stdin:
            print(json.dumps(probe()), flush=True)
    finally:
        dht.shutdown()


if __name__ == "__main__":
    main()
