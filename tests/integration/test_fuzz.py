"""Fuzzing the gateway from its own OpenAPI document (schemathesis), against real processes.

Every operation the served document lists is exercised with schemathesis's coverage cases
(boundary values, missing and wrong-typed parameters, unexpected methods) and with Hypothesis
fuzzing of valid and invalid data. No answer may be a 5xx, and every answer must be documented:
status code, content type and body schema. The gateway and its inference replica are dedicated
to this module, with small limits so that the sessions the fuzzer opens stay few and cheap.

API keys are on here, as an operator with a public endpoint runs the gateway. Every case is sent
twice over: with the key (the checks above), and without one or with a wrong one, where no
operation the document secures may serve anything (a 2xx other than v1's ``ok: false``): no
unauthenticated success.

``FUZZ_EXAMPLES`` (default 50) sets Hypothesis's examples per operation and mode: ``make fuzz``
runs 1,000 (over 10,000 requests). The counts per operation and status are printed (``-s``).
Last, the schemathesis CLI runs over the served document as a client would, and must not warn.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from client.probes import wait_until
from tests.helpers import Stack, dedicated_stack

FUZZ_KEY = "fz-7Qx2Lm9Vb4Nc8Rt1"
# Refused keys are not throttled here: the throttle (tested in test_gateway_security.py) would turn
# the keyed cases that follow the intruder's into 429s, since everything comes from one address.
KEYS = {"API_KEYS": f"fuzz:{FUZZ_KEY}", "AUTH_FAILURES_PER_MINUTE": "0"}
LIMITS = {"MAX_LENGTH_LIMIT": "64", "MAX_NEW_TOKENS_LIMIT": "4", "MAX_INPUT_CHARS": "256", "MAX_BODY_BYTES": "4096"}
SESSIONS = {"MAX_SESSIONS": "8", "SESSION_TTL_SECONDS": "5", "SESSION_REAPER_INTERVAL_SECONDS": "1"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "50")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_stack(swarm, model_dir, artifacts_dir) -> Iterator[Stack]:
    with dedicated_stack(
        swarm, model_dir, artifacts_dir, "fuzz", shared_env=LIMITS, inference_env=SESSIONS, gateway_env=KEYS
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def api_schema(fuzz_stack: Stack) -> schemathesis.BaseSchema:
    """The document the gateway serves (not the one built in process)."""
    return schemathesis.openapi.from_url(
        f"{fuzz_stack.gateway.base_url}/api/openapi.json", headers=AUTHENTICATED, timeout=10
    )


@pytest.fixture(scope="module")
def operations(api_schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    results = list(api_schema.get_all_operations())
    errors = [result.err() for result in results if not isinstance(result, schemathesis.core.result.Ok)]
    assert not errors, f"the served OpenAPI document has invalid operations: {errors}"
    return [result.ok() for result in results]


AUTHENTICATED = {"Authorization": f"Bearer {FUZZ_KEY}"}
UNAUTHENTICATED = [{}, {"Authorization": "Bearer fz-not-the-key-at-all"}, {"X-API-Key": FUZZ_KEY[:-1] + "x"}]


class Caller:
    """Sends cases to the gateway with the key and runs the checks on each answer; counts the calls."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = requests.Session()
        self.calls = 0
        self.statuses: Counter[tuple[str, int]] = Counter()  # (operation, status) -> answers

    def __call__(self, case: schemathesis.Case) -> None:
        response = self.send(case, AUTHENTICATED)
        try:
            case.validate_response(response, checks=CHECKS)
        finally:
            self._close_opened_session(case, response)

    def send(self, case: schemathesis.Case, auth: dict[str, str]) -> schemathesis.Response:
        """The case with ``auth``'s headers in place of any credentials it carries."""
        self.calls += 1
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "x-api-key")}
        response = case.call(base_url=self.base_url, session=self.http, headers={**headers, **auth}, timeout=60)
        self.statuses[case.operation.label, response.status_code] += 1
        return response

    def _close_opened_session(self, case: schemathesis.Case, response: schemathesis.Response) -> None:
        """Close a session the case opened: a full replica would refuse the next cases' (503), how
        many at once depending on the machine's speed, not on the API."""
        if case.operation.label != "GET /api/v1/open_inference_session" or response.status_code != 200:
            return
        try:
            body = response.json()
        except ValueError:
            return  # not an opened session (the checks judge the answer)
        if isinstance(body, dict) and isinstance(body.get("session_id"), str):
            close = f"{self.base_url}/api/v1/close_inference_session"
            self.http.get(close, params={"session_id": body["session_id"]}, headers=AUTHENTICATED, timeout=60)

    def report(self) -> str:
        operations = sorted({operation for operation, _ in self.statuses})
        lines = [f"{self.calls} requests checked"]
        for operation in operations:
            counts = {status: n for (label, status), n in sorted(self.statuses.items()) if label == operation}
            lines.append(f"  {operation}: {sum(counts.values())} ({', '.join(f'{s}: {n}' for s, n in counts.items())})")
        return "\n".join(lines)


class Intruder(Caller):
    """Sends each case without a key and with wrong ones; a secured operation must serve none."""

    def __call__(self, case: schemathesis.Case) -> None:
        for auth in UNAUTHENTICATED:
            response = self.send(case, auth)
            if case.operation.definition.raw.get("security") == []:
                continue  # the document's own operation, open by design
            assert not served(response), (
                f"{case.operation.label} served without a key: {response.status_code} " + (response.text[:300])
            )


def served(response: schemathesis.Response) -> bool:
    """Whether an answer serves something: a 2xx that is not v1's ``ok: false`` (its refusals and
    errors are HTTP 200) nor the empty answer to a CORS preflight (``OPTIONS`` needs no key)."""
    if not 200 <= response.status_code < 300:
        return False
    if response.request.method == "OPTIONS":
        return bool(response.content)
    try:
        body = response.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and body.get("ok") is False)


@pytest.fixture(params=["with the key", "without a key"])
def call(request, fuzz_stack: Stack) -> Iterator[Caller]:
    """The keyed caller (every documented check) or the intruder (every secured operation refuses)."""
    caller = (Caller if request.param == "with the key" else Intruder)(fuzz_stack.gateway.base_url)
    yield caller
    print(caller.report())


def has_inputs(operation: schemathesis.APIOperation) -> bool:
    return bool(list(operation.query) or list(operation.body) or list(operation.headers))


def collect_failures(label: str, test: Callable[[], None], failures: list[str]) -> None:
    """Run one operation's test; record its failure and go on with the other operations."""
    try:
        test()
    except (Exception, BaseExceptionGroup) as error:  # a failed check (a FailureGroup) or a broken call
        failures.append(f"{label}: {type(error).__name__}: {error}")


# The OpenAI API's fields and endpoints of scores, choices and shaping: the fuzzers cover them
# because the served document lists them (a field left out of it would go unfuzzed).
OPENAI_FIELDS = {
    "CompletionRequest": {"n", "best_of", "logprobs", "echo", "presence_penalty", "frequency_penalty", "logit_bias"},
    "ChatCompletionRequest": {"n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias"},
}


def test_the_document_lists_the_openai_scores_fields(fuzz_stack: Stack) -> None:
    document = requests.get(f"{fuzz_stack.gateway.base_url}/api/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    for name, fields in OPENAI_FIELDS.items():
        assert fields <= set(schemas[name]["properties"]), name
    assert {"/v1/tokenize", "/v1/detokenize"} <= set(document["paths"])


def test_coverage_cases_answer_as_documented(api_schema, operations, call) -> None:
    failures: list[str] = []
    for operation in operations:
        generation = api_schema.config.generation_for(operation=operation)
        cases = api_schema.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode), generation_config=generation
        )

        def run_all(cases=cases) -> None:
            for case in cases:
                call(case)

        collect_failures(operation.label, run_all, failures)
    assert not failures, "\n\n".join(failures)
    assert call.calls >= 10 * len(operations)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda mode: mode.value)
def test_fuzzed_requests_answer_as_documented(operations, call, mode: GenerationMode) -> None:
    failures: list[str] = []
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not has_inputs(operation):
            continue  # nothing to make invalid

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            call(case)

        collect_failures(operation.label, fuzz, failures)
    assert not failures, "\n\n".join(failures)
    assert call.calls >= len(operations)


def test_the_fuzzed_stack_still_serves(fuzz_stack: Stack) -> None:
    """After the fuzzing (and once its leftover sessions expired), a session works end to end."""
    base, http = fuzz_stack.gateway.base_url, requests.Session()
    http.headers.update(AUTHENTICATED)
    opened: dict = {}

    def open_session() -> bool:
        opened.update(http.get(f"{base}/api/v1/open_inference_session", params={"max_length": 32}, timeout=60).json())
        return opened["ok"]

    assert wait_until(open_session, timeout=15, interval=1), opened
    session_id = opened["session_id"]
    generated = http.post(
        f"{base}/api/v1/generate", data={"inputs": "Hello", "max_new_tokens": 2, "session_id": session_id}, timeout=60
    )
    assert generated.json()["ok"], generated.text
    closed = http.get(f"{base}/api/v1/close_inference_session", params={"session_id": session_id}, timeout=60)
    assert closed.json() == {"ok": True}


CLI_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""


def test_the_schemathesis_cli_sees_no_warnings(fuzz_stack: Stack, tmp_path, artifacts_dir) -> None:
    """``schemathesis run <url>/api/openapi.json`` as a client runs it: no server error and no
    operation "mostly rejected generated data" (the document says what validation accepts). Less
    two checks: v1 answers every error with HTTP 200, an unsupported method too (the seed's contract),
    where ``unsupported_method`` wants a 405, and a refused key too, where ``ignored_auth`` wants a 401
    (the intruder above checks every refusal, v1's included); and 413 (an input over the limit)
    counts as rejecting invalid data."""
    examples = os.environ.get("FUZZ_CLI_EXAMPLES", "10")
    (tmp_path / "schemathesis.toml").write_text(CLI_CONFIG)  # found in its working directory
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_stack.gateway.base_url}/api/openapi.json",
               "--max-examples", examples, "--seed", "1", "--no-color",
               "--exclude-checks", "unsupported_method,ignored_auth",
               "--header", f"Authorization: Bearer {FUZZ_KEY}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # its files there
    output = result.stdout + result.stderr
    (artifacts_dir / "schemathesis-cli.txt").write_text(output)  # the whole report
    print(output[-6000:])
    assert "mostly rejected" not in output and "Warning" not in output, output[-6000:]
    assert "Server error" not in output and "Test cases:" in output, output[-6000:]
    # What it still reports, by contract (docs/testing.md, "Fuzzing"): v1 answering invalid data with HTTP 200
    # (ST201), a plain GET of the WebSocket endpoint (426) and semantic limits (ST202).
