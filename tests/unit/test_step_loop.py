"""The WebSocket API's steps as the replica runs them: a fake planner, real generations and sessions."""

from __future__ import annotations

from services.common.api.params import GenerateParams, Limits
from services.common.api.replica_request import ReplicaRequest
from services.common.api.step_rule import StepsRequest, StopSequences
from services.inference.decoding import IncrementalDecoder
from services.inference.generation import Generation
from services.inference.sessions import SessionStore
from services.inference.step_loop import StepMessage, SteppedGeneration, StepsEnded
from tests.unit.fakes import TOKEN_BYTES, FakePetalsSession, FakeStepper, oracle

PROMPT = [ord(char) for char in "Hi"]


class FakePlanner:
    """``GenerationPlanner.prepare`` over a real session: the prompt with the first request, one token a step."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.requests: list[ReplicaRequest] = []

    def prepare(self, request: ReplicaRequest) -> Generation:
        self.requests.append(request)
        lease = self.store.acquire(request.params.session_id, request.client)
        input_ids = PROMPT if request.params.inputs else []
        new_tokens = request.params.max_new_tokens
        return Generation(FakeStepper(), lease, request.params, input_ids, new_tokens, IncrementalDecoder(TOKEN_BYTES))


def steps_request(session_id: str, stops: StopSequences, session_max_length: int) -> StepsRequest:
    params = GenerateParams("Hi", False, None, None, None, None, 1, session_id)
    first = ReplicaRequest(params, replace_last_token="!", client="key:a")
    return StepsRequest(first, stops, session_max_length)


def test_steps_run_until_the_session_is_full_and_only_the_first_carries_the_inputs():
    store = SessionStore(FakePetalsSession, replica_id="inference-0", ttl_s=60, max_sessions=4)
    session = store.open(6, client="key:a")
    planner = FakePlanner(store)
    request = steps_request(session.session_id, StopSequences("never", ("neither",)), 6)
    steps = SteppedGeneration(planner, request)
    events = list(steps.stream())
    steps.close()
    text = "".join(map(chr, oracle(PROMPT, 4)))
    messages = [event.message for event in events if event.message]  # the last one in StepsEnded
    assert messages == [{"ok": True, "outputs": char, "stop": index == 3, "token_count": 1}
                        for index, char in enumerate(text)]  # fmt: skip
    assert isinstance(events[-1], StepsEnded) and not events[-1].ended_by_extra
    assert all(isinstance(event, StepMessage) for event in events[:-1])
    assert [r.params.inputs for r in planner.requests] == ["Hi", None, None, None]
    assert [r.replace_last_token for r in planner.requests] == ["!", None, None, None]
    assert {r.stop_token for r in planner.requests} == {"never"} and {r.client for r in planner.requests} == {"key:a"}


def test_a_steps_request_goes_to_the_replica_and_back_unchanged():
    request = steps_request("inference-0.abc", StopSequences("</s>", ("Human:",)), 64)
    assert StepsRequest.from_json(request.to_json(), Limits()) == request
