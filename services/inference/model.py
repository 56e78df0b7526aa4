"""The Petals client model: loaded in the background, with swarm readiness tracking.

Loading (tokenizer, embeddings and LM head, a DHT client joining the swarm) happens in a
background thread so that ``/healthz`` answers at once; it retries until it succeeds, e.g.
while the swarm is not up yet, but never a patch that does not fit Petals (docs/patches.md). A
readiness thread then checks, every few seconds and without blocking requests, that a route
through the swarm serves every block of the model and that its servers answer.

A session may hold at most ``max_length`` tokens: ``MAX_LENGTH_LIMIT``, and no more than the model's
servers hold for one session (``MODEL_MAX_LENGTH``; by default what a Petals server of the model
holds unless told otherwise, its ``--inference_max_length`` default, at most the model's context
length). A Petals server refuses a longer session only when the session first reaches it, and the
client then retries through the swarm: refused here instead, at once, with a clear 400.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any

from services.common.startup.patching import PatchError
from services.common.web.errors import InvalidParameter, ModelNotFound, ServiceUnavailable
from services.inference.decoding import TokenBytes
from services.inference.metrics import HEAD_BATCH_SIZE, SWARM_READY
from services.inference.settings import InferenceSettings

logger = logging.getLogger(__name__)
_LOAD_RETRY_S = (1.0, 2.0, 5.0, 10.0)
_PING_TIMEOUT_S = 2.0
_ROUTE_ATTEMPTS = 3  # routes tried per check when servers on them do not answer
_UNREADY_RECHECK_S = 1.0  # pause between the checks of an unready replica (it recovers within it)
# Petals' own default of a server's --inference_max_length (petals/server/server.py).
PETALS_MAX_LENGTH, PETALS_MAX_LENGTH_GROUPED_QUERY = 2048, 8192


class ModelHandle:
    """Owns the tokenizer and the distributed model; reports readiness."""

    def __init__(self, settings: InferenceSettings) -> None:
        self._settings = settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.token_bytes: TokenBytes | None = None
        self.max_length = settings.limits.max_length  # bounded by the servers' once the model is loaded
        self._status = "the model is loading"
        self._ready = False
        self._stopping = threading.Event()
        self._route_checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="route-check")
        self._route_check: Future | None = None

    def start(self) -> None:
        """Load in the background, then keep checking the route through the swarm."""
        threading.Thread(target=self._run, name="model-loader", daemon=True).start()

    def stop(self) -> None:
        """Stop the background checks and leave the swarm (DHT node, routing thread)."""
        self._stopping.set()
        self._route_checker.shutdown(wait=False, cancel_futures=True)
        if self.model is not None:
            sequence_manager = self.model.transformer.h.sequence_manager
            sequence_manager.shutdown()
            sequence_manager.dht.shutdown()  # else its process keeps the worker from exiting

    def sequence_manager(self) -> Any:
        """The Petals client's view of the model's blocks on the DHT (None until the model is loaded)."""
        return self.model.transformer.h.sequence_manager if self.model is not None else None

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz."""
        return self._ready, self._status

    def require_ready(self) -> None:
        """Raise ServiceUnavailable with the reason unless the model can serve now."""
        if not self._ready:
            raise ServiceUnavailable(f"Temporarily unavailable: {self._status}. Retry in a few seconds.")

    def require_model(self, model: str | None) -> None:
        """Raise ModelNotFound unless ``model`` is None or the model this replica serves."""
        if model is not None and model != self._settings.model_name:
            raise ModelNotFound(model, [self._settings.model_name], where="by this replica")

    def require_length(self, tokens: int, what: str = "max_length") -> None:
        """Raise InvalidParameter (400) naming the limit if a session of ``tokens`` tokens is too long."""
        if tokens > self.max_length:
            raise InvalidParameter(
                f"{what} ({tokens} tokens) exceeds the limit of {self.max_length} tokens a session of "
                f"{self._settings.model_name} may hold (what its servers hold per session: MODEL_MAX_LENGTH, "
                "within MAX_LENGTH_LIMIT)",
                param="max_length",
            )

    @property
    def vocabulary_size(self) -> int:
        """How many token ids the model scores (its logits' width); the model must be loaded."""
        return int(self.model.config.vocab_size)

    def require_token_ids(self, token_ids: Iterable[int], param: str) -> None:
        """Raise InvalidParameter (400) naming ``param`` if an id is outside the model's vocabulary."""
        size = self.vocabulary_size
        for token_id in token_ids:
            if not 0 <= token_id < size:
                raise InvalidParameter(
                    f"{param} names token id {token_id}; {self._settings.model_name}'s ids run from 0 to {size - 1}",
                    param=param,
                )

    def open_petals_session(self, max_length: int):
        """A new Petals inference session reserving ``max_length`` tokens of attention cache."""
        from petals.client.inference_session import InferenceSession

        return InferenceSession(self.model.transformer.h.sequence_manager, max_length=max_length)

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set() and self.model is None:
            try:
                self._load()
            except PatchError as error:  # no retry mends it (patches.install() at start-up checks it first)
                self._status = f"model loading failed: {error}"
                logger.error("loading %s failed: %s", self._settings.model, error)
                return
            except Exception as error:  # keep retrying: the swarm may come up later
                delay = _LOAD_RETRY_S[min(attempt, len(_LOAD_RETRY_S) - 1)]
                self._status = f"model loading failed ({_short(error)}); retrying"
                logger.warning("loading %s failed, retrying in %.0f s", self._settings.model, delay, exc_info=True)
                attempt += 1
                self._stopping.wait(delay)
        while not self._stopping.is_set():
            self._check_route()
            # Between checks, ready or not: a swarm missing a block fails the check at once, and
            # checking again without a pause would spin a core until the block is served again.
            self._stopping.wait(self._settings.readiness_interval_s if self._ready else _UNREADY_RECHECK_S)

    def _load(self) -> None:
        import torch
        from petals import AutoDistributedModelForCausalLM
        from transformers import AutoTokenizer

        from services.inference import lm_head  # checked, with the other patches, by patches.install() at start-up

        settings = self._settings
        logger.info(
            "loading %s (dtype %s, device %s, %d torch threads)",
            settings.model, settings.torch_dtype, settings.device, torch.get_num_threads(),
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
        token_bytes = TokenBytes(tokenizer)  # before the swarm: an unsupported tokenizer fails at once
        dtype = settings.torch_dtype if settings.torch_dtype == "auto" else getattr(torch, settings.torch_dtype)
        options: dict[str, Any] = {
            "torch_dtype": dtype,
            "max_retries": settings.swarm_max_retries,
            "request_timeout": settings.swarm_request_timeout_s,
            "update_period": settings.swarm_update_period_s,
        }
        if settings.initial_peers:  # otherwise Petals joins the public swarm
            options["initial_peers"] = list(settings.initial_peers)
        if settings.dht_prefix:
            options["dht_prefix"] = settings.dht_prefix
        model = AutoDistributedModelForCausalLM.from_pretrained(settings.model, **options)
        model = model.to(settings.device).eval()
        batch_observer = HEAD_BATCH_SIZE.observe if settings.head_batching else None
        if head := lm_head.install(model.lm_head, settings.torch_threads, batch_observer):
            batching = ", concurrent sessions' tokens batched" if settings.head_batching else ""
            logger.info("LM head: one token's product by %s%s", type(head).__name__, batching)
        self.max_length = min(settings.limits.max_length, settings.model_max_length or servers_max_length(model.config))
        self.tokenizer, self.token_bytes, self.model = tokenizer, token_bytes, model
        self._status = "model loaded; looking for a route through the swarm"
        logger.info("model loaded")

    def _check_route(self) -> None:
        """Probe a route over all blocks in the background; a check that hangs counts as not ready."""
        if self._route_check is None or self._route_check.done():
            self._route_check = self._route_checker.submit(self._probe_route)
        try:
            self._route_check.result(timeout=self._settings.readiness_interval_s)
        except FutureTimeout:
            self._set_ready(False, "the swarm did not answer a routing request in time")
        except Exception as error:
            self._set_ready(False, f"no route through the swarm ({_short(error)})")
        else:
            self._set_ready(True, "ready")

    def _probe_route(self) -> None:
        """A route over every block whose servers all answer a ping.

        The swarm's records outlive a crashed server by minutes, so a route alone proves little:
        a server on it that does not answer is banned (Petals then routes around it) and another
        route is tried. A server that answers has its failure streak cleared, as Petals does after
        a successful request: its next ban is the short first one again, not one doubled by every
        ping that a busy moment made late (the only holder of a block, banned for many minutes,
        would keep the replica unready long after it recovered).
        """
        from petals.utils.ping import ping_parallel

        sequence_manager = self.model.transformer.h.sequence_manager
        timeout = min(self._settings.readiness_interval_s, _PING_TIMEOUT_S)
        for _ in range(_ROUTE_ATTEMPTS):
            peers = list({span.peer_id for span in sequence_manager.make_sequence(mode="max_throughput")})
            rtts = sequence_manager.dht.run_coroutine(partial(ping_parallel, peers, wait_timeout=timeout))
            unreachable = [peer for peer, rtt in rtts.items() if math.isinf(rtt)]
            for peer in rtts.keys() - unreachable:
                sequence_manager.on_request_success(peer)
            if not unreachable:
                return
            for peer in unreachable:
                sequence_manager.on_request_failure(peer)
        raise RuntimeError(f"servers on the route do not answer ({len(unreachable)} unreachable)")

    def _set_ready(self, ready: bool, status: str) -> None:
        if ready != self._ready:
            logger.info("readiness: %s", status)
        self._ready, self._status = ready, status
        SWARM_READY.set(1 if ready else 0)


def servers_max_length(config: Any) -> int:
    """The most tokens a Petals server of the model holds per session by default (8192 with grouped-query
    attention, else 2048), at most the model's context length."""
    grouped = getattr(config, "num_key_value_groups", 1) > 1
    default = PETALS_MAX_LENGTH_GROUPED_QUERY if grouped else PETALS_MAX_LENGTH
    context = getattr(config, "max_position_embeddings", None)
    return min(default, context) if isinstance(context, int) and context > 0 else default


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."
