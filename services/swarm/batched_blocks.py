"""One inference step of several sessions through a Petals server's Llama or BLOOM blocks, as one forward pass.

Each session brings the hidden states of its new tokens (one while it decodes, several for a
prompt), the sessions' rows side by side in one ``[rows, 1, hidden]`` tensor, and its own attention
cache (Petals' layout, per block: keys ``[1, kv_heads, head_dim, max_length]``, values ``[1, kv_heads,
max_length, head_dim]``, the first ``prefix`` positions filled). ``inference_step`` runs, block after
block, the norms, the q/k/v and output projections and the MLP on all rows at once (one read of the
weights per step instead of one per session), applies each row's rotary position, writes each
session's new keys and values into its cache in place, and attends per session over its own cache,
causally among its new tokens. The arithmetic is Petals' own (``petals.models.llama.block``:
``WrappedLlamaBlock`` over transformers' ``LlamaDecoderLayer``), so each session's output equals its
step alone up to float rounding.

Fenced with the pool that calls it (services/swarm/batching_pool.py, docs/patches.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

LLAMA_BLOCK, BLOOM_BLOCK = "WrappedLlamaBlock", "WrappedBloomBlock"
Caches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per session: (keys, values) of one block


@dataclass(frozen=True)
class Steps:
    """Each session's place in a batched step: its prefix (the position of its first new token) and how
    many new tokens it brings; its rows follow the previous session's."""

    prefixes: tuple[int, ...]
    lengths: tuple[int, ...]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """(first row, prefix, length) per session."""
        row = 0
        for prefix, length in zip(self.prefixes, self.lengths, strict=True):
            yield row, prefix, length
            row += length

    def row_positions(self) -> list[int]:
        """Every row's position in its session."""
        return [prefix + offset for _, prefix, length in self for offset in range(length)]


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
def inference_step(
    blocks: Sequence[torch.nn.Module], caches: Sequence[Caches], hidden_states: torch.Tensor, steps: Steps
) -> torch.Tensor:
    """``hidden_states`` ``[rows, 1, hidden]`` through ``blocks``; ``caches[b][s]`` is session s's (keys,
    values) in block b, written from its prefix on in place."""
    for block, block_caches in zip(blocks, caches, strict=True):
        hidden_states = _LAYERS[type(block).__name__](block, block_caches, hidden_states, steps)
    return hidden_states


def _llama_layer(block, caches: Caches, hidden_states: torch.Tensor, steps: Steps) -> torch.Tensor:
    residual = hidden_states
    attended = _llama_attention(block.self_attn, caches, block.input_layernorm(hidden_states), steps)
    hidden_states = residual + attended
    return hidden_states + block.mlp(block.post_attention_layernorm(hidden_states))


def _bloom_layer(block, caches: Caches, hidden_states: torch.Tensor, steps: Steps) -> torch.Tensor:
    """transformers' ``BloomBlock.forward`` on every session's new tokens (eval: no dropout)."""
    normed = block.input_layernorm(hidden_states)
    residual = normed if block.apply_residual_connection_post_layernorm else hidden_states
    attention_output = residual + _bloom_attention(block.self_attention, caches, normed, steps)
    normed = block.post_attention_layernorm(attention_output)
    residual = normed if block.apply_residual_connection_post_layernorm else attention_output
    return block.mlp(normed, residual)


def _bloom_attention(attention, caches: Caches, hidden_states: torch.Tensor, steps: Steps) -> torch.Tensor:
    """``BloomAttention.forward`` less the residual: alibi by key position, each session over its own cache."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    rows, heads, head_dim = len(hidden_states), attention.num_heads, attention.head_dim
    query, key, value = attention._split_heads(attention.query_key_value(hidden_states))  # [rows, 1, heads, d]
    longest = max(prefix + length for _, prefix, length in steps)
    mask = torch.ones(1, longest, device=query.device)
    alibis = build_alibi_tensor(mask, num_heads=heads, dtype=query.dtype)  # [heads, 1, length]: a prefix per session
    outputs = []
    for (start, prefix, length), (key_cache, value_cache) in zip(steps, caches, strict=True):
        end, total = start + length, prefix + length
        key_cache[0, :, :, prefix:total] = key[start:end, 0].permute(1, 2, 0)
        value_cache[0, :, prefix:total] = value[start:end, 0].transpose(0, 1)
        session_query = query[start:end, 0].transpose(0, 1)  # [heads, length, d]
        scores = alibis[:, :, :total].baddbmm(batch1=session_query, batch2=key_cache[0, :, :, :total],
                                              beta=attention.beta, alpha=attention.inv_norm_factor)  # fmt: skip
        scores = _causal(scores, prefix, length)  # [heads, length, total]
        if scores.dtype == torch.float16:
            scores = scores.to(torch.float)
        probabilities = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        outputs.append(torch.bmm(probabilities, value_cache[0, :, :total]).transpose(0, 1))  # [length, heads, d]
    return attention.dense(torch.cat(outputs).reshape(rows, 1, heads * head_dim))


def _llama_attention(attention, caches: Caches, hidden_states: torch.Tensor, steps: Steps) -> torch.Tensor:
    """``LlamaAttention.forward`` (Petals' optimized one) on every session's new tokens. Each session's
    query heads are grouped by the key/value head they share (``[kv_heads, groups x length, head_dim]``)
    and multiplied by its cache as Petals stores it (keys ``[kv_heads, head_dim, length]``): no copy of
    the cache (``repeat_kv``), two products per session and block."""
    rows, heads, head_dim = len(hidden_states), attention.num_heads, attention.head_dim
    kv_heads = attention.num_key_value_heads
    groups = heads // kv_heads
    query = attention.q_proj(hidden_states).view(rows, 1, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden_states).view(rows, 1, kv_heads, head_dim).transpose(1, 2)
    value = attention.v_proj(hidden_states).view(rows, 1, kv_heads, head_dim).transpose(1, 2)
    query, key = _rotate(attention, query, key, value, steps.row_positions())
    queries = (query / math.sqrt(head_dim)).reshape(rows, kv_heads, groups, head_dim)
    keys, values = key[:, :, 0], value[:, :, 0]  # [rows, kv_heads, d]
    outputs = []
    for (start, prefix, length), (key_cache, value_cache) in zip(steps, caches, strict=True):
        end, total = start + length, prefix + length
        key_cache[0, :, :, prefix:total] = keys[start:end].permute(1, 2, 0)
        value_cache[0, :, prefix:total] = values[start:end].transpose(0, 1)
        session_query = queries[start:end].permute(1, 2, 0, 3).reshape(kv_heads, groups * length, head_dim)
        scores = torch.matmul(session_query, key_cache[0, :, :, :total]).view(kv_heads * groups, length, total)
        probabilities = torch.softmax(_causal(scores, prefix, length), dim=-1, dtype=torch.float32).to(query.dtype)
        attended = torch.matmul(probabilities.view(kv_heads, groups * length, total), value_cache[0, :, :total])
        outputs.append(attended.view(kv_heads, groups, length, head_dim).permute(2, 0, 1, 3))  # [length, kv, groups, d]
    return attention.o_proj(torch.cat(outputs).reshape(rows, 1, heads * head_dim))


def _causal(scores: torch.Tensor, prefix: int, length: int) -> torch.Tensor:
    """``scores`` ``[heads, length, prefix + length]`` with each new token's later positions masked."""
    if length == 1:
        return scores
    later = torch.ones(length, prefix + length, dtype=torch.bool, device=scores.device).triu(prefix + 1)
    return scores.masked_fill(later, torch.finfo(scores.dtype).min)


def _rotate(attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Rotary embeddings, each row at its own position (Petals' ``apply_rotary_pos_emb``)."""
    from petals.models.llama.block import apply_rotary_pos_emb

    cos, sin = attention.rotary_emb(value, seq_len=max(positions) + 1)  # [1, 1, length, head_dim]
    index = torch.tensor(positions, device=cos.device)
    cos, sin = cos[0, 0, index][:, None, None, :], sin[0, 0, index][:, None, None, :]
    return apply_rotary_pos_emb(query, key, cos, sin)


_LAYERS = {LLAMA_BLOCK: _llama_layer, BLOOM_BLOCK: _bloom_layer}
