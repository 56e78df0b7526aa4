"""The swarm's state for this replica's model, read from the DHT in the background.

Every ``SWARM_STATE_REFRESH_SECONDS`` a thread reads what every server announces for each of the
model's blocks (Petals' ``get_remote_module_infos``, the records its routing reads too, but without
the client's bans), turns it into one ``ServerEntry`` per server and a bounded ``ModelSwarm``
(services/common/api/swarm_state.py), and sets the swarm metrics. Requests only read the last
summary: the DHT is never read on a request's path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from services.common.api.swarm_state import ModelSwarm, ServerEntry, SwarmThresholds, summarise
from services.inference.metrics import record_swarm

logger = logging.getLogger(__name__)
_UNLOADED_RECHECK_S = 1.0  # until the model is loaded (the DHT client comes with it)


class SwarmWatch:
    """Keeps the last ``ModelSwarm`` of one model, refreshed by a background thread."""

    def __init__(
        self,
        model_name: str,
        sequence_manager: Callable[[], Any],
        *,
        refresh_s: float,
        max_servers: int,
        thresholds: SwarmThresholds,
    ) -> None:
        self._model_name = model_name
        self._sequence_manager = sequence_manager  # None until the model is loaded
        self._refresh_s = refresh_s
        self._max_servers = max_servers
        self._thresholds = thresholds
        self._stopping = threading.Event()
        self._latest = ModelSwarm.unknown(model_name, 0, refresh_s)

    def latest(self) -> ModelSwarm:
        """The last summary (``unknown`` until the first read)."""
        return self._latest

    def start(self) -> None:
        threading.Thread(target=self._run, name="swarm-watch", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            read = False
            try:
                read = self.refresh()
            except Exception:  # the next period tries again; the last summary stays, its updated_at ages
                logger.warning("reading the swarm's state failed", exc_info=True)
            self._stopping.wait(self._refresh_s if read else min(self._refresh_s, _UNLOADED_RECHECK_S))

    def refresh(self) -> bool:
        """Read the DHT once and publish the summary; False before the model is loaded."""
        manager = self._sequence_manager()
        if manager is None:
            return False
        from petals.utils.dht import get_remote_module_infos

        infos = get_remote_module_infos(manager.dht, manager.block_uids, latest=True)
        self._latest = summarise(
            self._model_name, len(infos), server_entries(infos), max_servers=self._max_servers,
            refresh_seconds=self._refresh_s, thresholds=self._thresholds,
        )  # fmt: skip
        record_swarm(self._latest)
        return True


def server_entries(module_infos: Sequence[Any]) -> Iterable[ServerEntry]:
    """One entry per server from Petals' ``RemoteModuleInfo`` of each block (in block order): its
    announced block range (else the blocks it was found on), state, throughput, cache room, version."""
    found: dict[Any, tuple[int, int, Any]] = {}  # peer id -> (first block, last block + 1, its info)
    for block, module in enumerate(module_infos):
        for peer_id, info in module.servers.items():
            first, _, _ = found.get(peer_id, (block, block, info))
            found[peer_id] = (first, block + 1, info)
    offset = _first_block_index(module_infos)
    for peer_id, (first, end, info) in found.items():
        if info.start_block is not None and info.end_block is not None:
            first, end = info.start_block - offset, info.end_block - offset
        yield ServerEntry(
            peer_id=str(peer_id), start_block=first, end_block=end, state=info.state.name.lower(),
            throughput=float(info.throughput) if info.throughput is not None else None,
            cache_tokens_left=info.cache_tokens_left, version=info.version,
        )  # fmt: skip


def _first_block_index(module_infos: Sequence[Any]) -> int:
    """The index of the model's first block in its DHT keys (``prefix.N``): 0 for a whole model."""
    return int(module_infos[0].uid.rpartition(".")[2]) if module_infos else 0
