"""One decoding step of several sessions through a Petals server's Llama or BLOOM blocks, as one forward pass.

Each session brings one new token's hidden state ``[1, 1, hidden]`` and its own attention cache
(Petals' layout, per block: keys ``[1, kv_heads, head_dim, max_length]``, values ``[1, kv_heads,
max_length, head_dim]``, the first ``prefix_length`` positions filled). ``decode_step`` stacks the
hidden states and, block after block, runs the norms, the q/k/v and output projections and the MLP
on all sessions at once (one read of the weights per step instead of one per session), applies
each session's own rotary position, writes each session's new key and value into its cache in
place, and attends per session over its own cache. The arithmetic is Petals' own
(``petals.models.llama.block``: ``WrappedLlamaBlock`` over transformers' ``LlamaDecoderLayer``),
so each session's output equals its step alone up to float rounding.

Fenced with the pool that calls it (services/swarm/batching_pool.py, docs/patches.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LLAMA_BLOCK, BLOOM_BLOCK = "WrappedLlamaBlock", "WrappedBloomBlock"
Caches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per session: (keys, values) of one block


def batchable_block(backend) -> torch.nn.Module | None:
    """The backend's one block if this module can batch it, else None: Llama or BLOOM, one shard (no
    tensor-parallel split), no sliced projections (``pretraining_tp``), no rope scaling (the dynamic kind
    depends on the length of the longest sequence, which a batch would share)."""
    shards = getattr(backend.module, "module_shards", ())
    if len(shards) != 1 or type(shards[0]).__name__ not in _LAYERS:
        return None
    block = shards[0]
    if type(block).__name__ == BLOOM_BLOCK:  # BLOOM slices its projections only when slow_but_exact
        sliced = block.self_attention.pretraining_tp > 1 and block.self_attention.slow_but_exact
        return None if sliced else block
    config = block.self_attn.config
    if getattr(config, "pretraining_tp", 1) != 1 or getattr(config, "rope_scaling", None):
        return None
    return block


@torch.inference_mode()
def decode_step(
    blocks: Sequence[torch.nn.Module],
    caches: Sequence[Caches],
    hidden_states: torch.Tensor,
    positions: Sequence[int],
) -> torch.Tensor:
    """``hidden_states`` ``[sessions, 1, hidden]`` through ``blocks``; ``caches[b][s]`` is session s's
    (keys, values) in block b, written at ``positions[s]`` (its prefix length) in place."""
    for block, block_caches in zip(blocks, caches, strict=True):
        hidden_states = _LAYERS[type(block).__name__](block, block_caches, hidden_states, positions)
    return hidden_states


def _llama_layer(block, caches: Caches, hidden_states: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    residual = hidden_states
    attended = _llama_attention(block.self_attn, caches, block.input_layernorm(hidden_states), positions)
    hidden_states = residual + attended
    return hidden_states + block.mlp(block.post_attention_layernorm(hidden_states))


def _bloom_layer(block, caches: Caches, hidden_states: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """transformers' ``BloomBlock.forward`` for one new token per session (eval: no dropout)."""
    normed = block.input_layernorm(hidden_states)
    residual = normed if block.apply_residual_connection_post_layernorm else hidden_states
    attention_output = residual + _bloom_attention(block.self_attention, caches, normed, positions)
    normed = block.post_attention_layernorm(attention_output)
    residual = normed if block.apply_residual_connection_post_layernorm else attention_output
    return block.mlp(normed, residual)


def _bloom_attention(attention, caches: Caches, hidden_states: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """``BloomAttention.forward`` less the residual: alibi per session, each over its own cache."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    sessions, heads, head_dim = len(positions), attention.num_heads, attention.head_dim
    query, key, value = attention._split_heads(attention.query_key_value(hidden_states))  # [n, 1, heads, d]
    output = torch.empty(sessions, 1, heads, head_dim, dtype=query.dtype, device=query.device)
    mask = torch.ones(1, max(positions) + 1, device=query.device)
    alibis = build_alibi_tensor(mask, num_heads=heads, dtype=query.dtype)  # [heads, 1, length]: a prefix per session
    for index, (position, (key_cache, value_cache)) in enumerate(zip(positions, caches, strict=True)):
        key_cache[0, :, :, position] = key[index, 0]
        value_cache[0, :, position, :] = value[index, 0]
        keys, values = key_cache[0, :, :, : position + 1], value_cache[0, :, : position + 1]
        alibi = alibis[:, :, : position + 1]
        scores = alibi.baddbmm(batch1=query[index, 0][:, None], batch2=keys, beta=attention.beta,
                               alpha=attention.inv_norm_factor)  # fmt: skip
        if scores.dtype == torch.float16:
            scores = scores.to(torch.float)
        probabilities = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output[index, 0] = torch.bmm(probabilities, values)[:, 0]
    return attention.dense(output.reshape(sessions, 1, heads * head_dim))


def _llama_attention(attention, caches: Caches, hidden_states: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """``LlamaAttention.forward`` (Petals' optimized one) for one new token per session. Each session's
    query heads are grouped by the key/value head they share (``[kv_heads, groups, head_dim]``) and
    multiplied by its cache as Petals stores it (keys ``[kv_heads, head_dim, length]``): no copy of the
    cache (``repeat_kv``) and two products per session and block."""
    sessions, heads, head_dim = len(positions), attention.num_heads, attention.head_dim
    kv_heads = attention.num_key_value_heads
    query = attention.q_proj(hidden_states).view(sessions, 1, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden_states).view(sessions, 1, kv_heads, head_dim).transpose(1, 2)
    value = attention.v_proj(hidden_states).view(sessions, 1, kv_heads, head_dim).transpose(1, 2)
    query, key = _rotate(attention, query, key, value, positions)
    queries = (query / math.sqrt(head_dim)).reshape(sessions, kv_heads, heads // kv_heads, head_dim).unbind(0)
    outputs = []
    for position, (key_cache, value_cache), session_query, session_key, session_value in zip(
        positions, caches, queries, key[:, :, 0].unbind(0), value[:, :, 0].unbind(0), strict=True
    ):
        key_cache[0, :, :, position] = session_key
        value_cache[0, :, position, :] = session_value
        scores = torch.matmul(session_query, key_cache[0, :, :, : position + 1])  # [kv_heads, groups, length]
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        outputs.append(torch.matmul(probabilities, value_cache[0, :, : position + 1]))
    return attention.o_proj(torch.stack(outputs).reshape(sessions, 1, heads * head_dim))


def _rotate(attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Rotary embeddings, each session at its own position (Petals' ``apply_rotary_pos_emb``)."""
    from petals.models.llama.block import apply_rotary_pos_emb

    cos, sin = attention.rotary_emb(value, seq_len=max(positions) + 1)  # [1, 1, length, head_dim]
    index = torch.tensor(positions, device=cos.device)
    cos, sin = cos[0, 0, index][:, None, None, :], sin[0, 0, index][:, None, None, :]
    return apply_rotary_pos_emb(query, key, cos, sin)


_LAYERS = {LLAMA_BLOCK: _llama_layer, BLOOM_BLOCK: _bloom_layer}
