"""A Petals server's patches, installed (and checked) in one place before Petals starts (its forks
inherit them); a patch that does not fit raises PatchError with one line. See docs/patches.md."""

from __future__ import annotations

from services.swarm import batching_pool, bitsandbytes_triton, grouped_inference, small_tensors


def install(small_tensor_bytes: int, batching: bool = False) -> None:
    """bitsandbytes' triton-free path (where needed), small tensors by value up to ``small_tensor_bytes``,
    then, if ``batching``, the batching inference pool (services/swarm/batching_pool.py) and the grouped
    inference stream that feeds it (services/swarm/grouped_inference.py)."""
    bitsandbytes_triton.install()  # before anything imports bitsandbytes
    small_tensors.install(small_tensor_bytes)
    if batching:
        batching_pool.install()
        grouped_inference.install()
