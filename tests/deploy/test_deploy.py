"""The default chart, run for real: every pod of `helm template` with no values, from the images
scripts/build_images.sh built, under podman, as Kubernetes would run them (tests/deploy/pod_harness.py).

Then, through the gateway: a chat answer from the embedded SmolLM2 ("Paris" at temperature 0, the
OpenAI API), a v1 session continued without inputs, a v2 stream to the other model (tiny BLOOM),
the model list, the chat page's calls under the chart's default limits; the inference replicas'
/metrics; the swarm servers' batching metrics (continuous batching is on by default); a SmolLM2
replica's pod stopped while sessions converse (its sessions handed over, none lost) and recreated;
the pods' security settings seen from inside; a graceful stop within each pod's grace period; then
a re-deploy of every pod from a second render that keeps the first render's seed Secret (what
`helm upgrade` renders): ready again, the same swarm.

Needs root, podman and the built images: `make test-deploy` installs the tools, builds the images and
runs this module (about 25 minutes from nothing on this project's machine, see docs/testing.md).
Skipped without RUN_DEPLOY_TESTS=1.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml

from client.api import Api, connect_ws
from services.common.p2p import swarm_identity
from services.common.web.sse import parse_sse
from tests.conversations import ANSWER_TIMEOUT_S, ChatSession, SocketSession, V1Session
from tests.deploy.pod_harness import HarnessError, PodHarness, render_chart, summary
from tests.helpers import metric_value

ROOT = Path(__file__).resolve().parents[2]
RELEASE, NAMESPACE = "chat", "llm"
FULLNAME = f"{RELEASE}-petals-chat"
IMAGES = ["petals-chat-ui", "petals-chat-gateway", "petals-chat-inference", "petals-chat-swarm"]
READY_TIMEOUT_S = float(os.environ.get("DEPLOY_READY_TIMEOUT", "1200"))

pytestmark = [
    pytest.mark.timeout(3000),
    pytest.mark.skipif(os.environ.get("RUN_DEPLOY_TESTS") != "1", reason="runs the chart's pods: make test-deploy"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0, reason="podman as root is needed"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="no podman: make test-deploy installs it"),
]

ARTIFACTS = ROOT / "test-artifacts" / "deploy"


def http(method: str, url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def get_json(url: str, body: dict | None = None) -> dict:
    status, text = http("POST" if body is not None else "GET", url, body)
    assert status == 200, f"{url}: {status} {text[:500]}"
    return json.loads(text)


@pytest.fixture(scope="module")
def cluster():
    """The default chart's pods, all ready; removed afterwards (also on failure)."""
    docs = render_chart(release=RELEASE, namespace=NAMESPACE)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    harness = PodHarness(docs, namespace=NAMESPACE)
    for image in IMAGES:
        found = harness.podman("image", "exists", f"localhost/{image}:0.1.0", check=False)
        assert found.returncode == 0, f"{image}:0.1.0 is not built: run scripts/build_images.sh (make test-deploy)"
    started = time.monotonic()
    try:
        harness.plan()
        harness.start()
        try:
            harness.ready_s = harness.wait_ready(READY_TIMEOUT_S)
        finally:
            (ARTIFACTS / "events.txt").write_text("\n".join(harness.events) + "\n" + summary(harness.pods) + "\n")
        print(f"\nall {len(harness.pods)} pods ready {harness.ready_s:.0f} s after start\n{summary(harness.pods)}")
        yield harness
    finally:
        for pod in harness.pods:
            for c in pod.containers:
                if harness.state(c):  # not yet removed (the re-deploy test removes them, keeping their logs)
                    (ARTIFACTS / f"{c.podman_name}.log").write_text(harness.logs(c, 400))
        harness.remove()
        print(f"harness ran {time.monotonic() - started:.0f} s")


def gateway(cluster: PodHarness, index: int = 0) -> str:
    return cluster.url(f"{FULLNAME}-gateway-{index}")


def test_every_pod_of_the_default_chart_runs_and_is_ready(cluster):
    owners = {p.owner for p in cluster.pods}
    assert owners == {
        f"Deployment/{FULLNAME}-gateway", f"Deployment/{FULLNAME}-ui",
        f"StatefulSet/{FULLNAME}-inference-smollm2", f"StatefulSet/{FULLNAME}-inference-tiny-bloom",
        f"StatefulSet/{FULLNAME}-swarm-smollm2-0", f"StatefulSet/{FULLNAME}-swarm-smollm2-1",
        f"StatefulSet/{FULLNAME}-swarm-tiny-bloom-0",
    }  # fmt: skip
    assert len(cluster.pods) == 2 + 2 + 2 + 1 + 3  # HPA minReplicas for the web tiers, the StatefulSets' replicas
    assert all(p.ready for p in cluster.pods), summary(cluster.pods)
    containers = [c for p in cluster.pods for c in p.containers]
    assert [c.restarts for c in containers] == [0] * len(containers), cluster.events  # servers wait for server 0


def test_the_gateway_routes_to_every_replica_of_both_models(cluster):
    for index in (0, 1):
        ready = get_json(gateway(cluster, index) + "/readyz")
        text = json.dumps(ready)
        for pod in [
            f"{FULLNAME}-inference-smollm2-0",
            f"{FULLNAME}-inference-smollm2-1",
            f"{FULLNAME}-inference-tiny-bloom-0",
        ]:
            assert pod in text, ready
    models = get_json(gateway(cluster) + "/v1/models")
    names = [m["id"] for m in models["data"]]
    assert names[0] == "smollm2-135m-instruct" and set(names) == {"smollm2-135m-instruct", "tiny-bloom"}, models


def test_smollm2_answers_paris_through_the_openai_api(cluster):
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 20,
    }
    answer = get_json(gateway(cluster) + "/v1/chat/completions", body)
    text = answer["choices"][0]["message"]["content"]
    assert "Paris" in text, answer
    (ARTIFACTS / "france.json").write_text(json.dumps(answer, indent=2))


def test_a_v1_session_continues_without_inputs_on_its_replica(cluster):
    base = gateway(cluster, 1) + "/api/v1"
    opened = get_json(base + "/open_inference_session?max_length=256")  # no model: DEFAULT_MODEL, SmolLM2
    assert opened["ok"], opened
    session = opened["session_id"]
    assert session.startswith(f"{FULLNAME}-inference-smollm2-"), session
    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    first = get_json(base + "/generate", {"inputs": prompt, "max_new_tokens": 4, "session_id": session})
    rest = get_json(base + "/generate", {"max_new_tokens": 6, "session_id": session})  # no inputs: continue
    assert first["ok"] and rest["ok"], (first, rest)
    assert "Paris" in first["outputs"] + rest["outputs"], (first, rest)
    assert get_json(base + f"/close_inference_session?session_id={session}")["ok"]
    gone = get_json(base + "/generate", {"max_new_tokens": 1, "session_id": session})
    assert not gone["ok"] and f"Session {session} expired or does not exist" in gone["traceback"]


def test_a_v2_stream_reaches_the_other_model(cluster):
    body = {"model": "tiny-bloom", "inputs": "Hello", "max_new_tokens": 5, "do_sample": 0}
    status, text = http("POST", gateway(cluster) + "/api/v2/generate_stream", body)
    assert status == 200, text[:500]
    done = list(parse_sse([text.encode()]))[-1][1]
    assert done["ok"] and done["generated_tokens"] == 5, text[-500:]


def test_the_chat_pages_calls_answer_under_the_charts_default_limits(cluster):
    """What the chat page sends (services/ui/static/chat.js): the models, a session, a few streamed
    turns in it, the close; none refused by the default rate limit or session quota."""
    base = gateway(cluster)
    assert get_json(base + "/v1/models")["data"]
    opened = get_json(base + "/api/v1/open_inference_session?max_length=256&model=smollm2-135m-instruct")
    assert opened["ok"], opened
    session = opened["session_id"]
    for turn in ("Hello!", " Name a colour.", " And a fruit?"):
        body = {"model": "smollm2-135m-instruct", "session_id": session, "inputs": turn, "max_new_tokens": 4,
                "do_sample": 0}  # fmt: skip
        status, text = http("POST", base + "/api/v2/generate_stream", body)
        assert status == 200, text[:500]
        done = list(parse_sse([text.encode()]))[-1][1]
        assert done["ok"] and done["generated_tokens"] == 4, text[-500:]
    assert get_json(base + f"/api/v1/close_inference_session?session_id={session}")["ok"]


def test_the_inference_replicas_export_metrics(cluster):
    generated = {}
    for pod in cluster.pods:
        if "-inference-" in pod.name:
            status, text = http("GET", cluster.url(pod.name) + "/metrics")
            assert status == 200 and "petals_chat_token_latency_seconds_bucket" in text, pod.name
            lines = [line for line in text.splitlines() if line.startswith("petals_chat_generated_tokens_total")]
            generated[pod.name] = sum(float(line.split()[-1]) for line in lines)
    assert generated[f"{FULLNAME}-inference-tiny-bloom-0"] >= 5, generated
    # the France answer (8 tokens) and the v1 session (4 + the rest of the answer)
    assert sum(v for k, v in generated.items() if "smollm2" in k) >= 12, generated


SWARM_METRICS_PORT = yaml.safe_load((ROOT / "charts" / "petals-chat" / "values.yaml").read_text())["swarm"]["metrics"][
    "port"
]


def test_every_swarm_server_batches_and_counts_its_steps(cluster):
    """Continuous batching is on by default: each server's metrics port counts the steps it ran (every
    server holds its own blocks, so each ran those of the answers above)."""
    steps = {}
    for pod in cluster.pods:
        if "-swarm-" in pod.name:
            status, text = http("GET", cluster.url(pod.name, SWARM_METRICS_PORT) + "/metrics")
            assert status == 200, (pod.name, status)
            lines = [line for line in text.splitlines() if line.startswith("petals_chat_swarm_steps_total")]
            steps[pod.name] = sum(float(line.split()[-1]) for line in lines)
    assert len(steps) == 3 and all(count > 0 for count in steps.values()), steps


SMOLLM2 = "smollm2-135m-instruct"
# Between a session's requests. Every request of this test comes from one address: under the chart's
# default rate limit (60 a minute per client and gateway worker, bursts of 20) whichever workers they reach.
PACE_S = {"v1": 2.5, "ws": 2.5, "chat": 4.0}
STEPS_AROUND_STOP = 2  # requests of each session before the stop, and after it has ended


@dataclass(frozen=True)
class GatewayReference:
    """Uninterrupted texts from the cluster itself: one greedy request for a session's every token
    (several one-token calls concatenate to it: the v1 contract), and its chat run again."""

    api: Api
    chat: openai.OpenAI

    def text(self, prompt: str, tokens: int) -> str:
        return self.api.call("POST", "generate", {"inputs": prompt, "max_new_tokens": tokens})["outputs"]


def replica_metric(cluster: PodHarness, pod: str, sample: str) -> float:
    return metric_value(http("GET", cluster.url(pod) + "/metrics")[1], sample)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.5)


def conversing_runs(cluster: PodHarness, chat: openai.OpenAI) -> list:
    """Three v1 sessions (alternating gateways), a WebSocket (gateway 1) and a chat (gateway 0), begun. Every
    request here comes from one address: after the stop the survivor holds them all, over the chart's default
    quota of 4 per client (maxSessionsPerClient), so a session opened there would close the least recently used."""
    bases = [gateway(cluster, 0), gateway(cluster, 1)]
    runs: list = [
        V1Session(Api(bases[i % 2], ANSWER_TIMEOUT_S), f"Count from {20 * i + 1}: {20 * i + 1},", PACE_S["v1"])
        for i in range(3)
    ]
    begin_on_both_replicas(runs)
    ws = connect_ws(8080, host=cluster.pod(f"{FULLNAME}-gateway-1").ip)
    runs += [
        SocketSession(ws, "Count backwards from 90: 90, 89,", PACE_S["ws"], "ws"),
        ChatSession(chat, SMOLLM2, 0, PACE_S["chat"]),
    ]
    for run in runs[-2:]:
        run.begin()
    return runs


def begin_on_both_replicas(runs: list[V1Session], timeout_s: float = 60) -> None:
    """Begin the v1 sessions; while they all sit on one replica (each gateway worker balances by the loads it
    has polled, so a quick series can land on one), the last is closed and begun again."""
    for run in runs:
        run.begin()
    deadline = time.monotonic() + timeout_s
    while len({run.holder() for run in runs}) < 2:
        assert time.monotonic() < deadline, f"no v1 session on a second replica within {timeout_s} s"
        runs[-1].end()
        runs[-1].outputs.clear()
        time.sleep(1)
        runs[-1].begin()


def converse_around(runs: list, action: Callable[[], dict]) -> dict:
    """Every run converses: ``STEPS_AROUND_STOP`` requests each, ``action``, as many again; its result.
    A client's error raises."""

    def steps_more() -> None:
        steps = [run.steps for run in runs]
        done = lambda: all(r.steps >= s + STEPS_AROUND_STOP for r, s in zip(runs, steps, strict=True))  # noqa: E731
        ended = lambda: any(future.done() for future in futures)  # noqa: E731 - a client's error: raised below
        wait_until(lambda: done() or ended(), 2 * ANSWER_TIMEOUT_S, f"{STEPS_AROUND_STOP} more requests of each")

    stop = threading.Event()
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run.converse, stop) for run in runs]
        try:
            steps_more()
            result = action()
            steps_more()
        finally:
            stop.set()
            for future in futures:
                future.result()
    return result


def takes_new_sessions(base: str, replica: str, timeout_s: float = 60) -> None:
    """A session opened through the gateway at ``base`` lands on ``replica`` (the least loaded) once every
    worker of that gateway has polled it ready; one that lands elsewhere meanwhile is closed."""
    api, deadline = Api(base, ANSWER_TIMEOUT_S), time.monotonic() + timeout_s
    while True:
        session = api.open_session(64)
        if session.startswith(replica + "."):
            assert api.call("POST", "generate", {"session_id": session, "inputs": "Hi", "max_new_tokens": 2})["ok"]
            assert api.close_session(session) == {"ok": True}
            return
        assert api.close_session(session) == {"ok": True}
        assert time.monotonic() < deadline, f"no new session on {replica} within {timeout_s} s"
        time.sleep(1)


def test_a_stopped_replica_hands_its_sessions_over_and_comes_back(cluster):
    """An inference pod stopped as Kubernetes deletes it (SIGTERM, its grace period) while sessions converse
    through both gateways: v1 one token per request, a WebSocket, an OpenAI chat reusing its conversation.
    No client sees an error, every text equals an uninterrupted run's, the survivor counts what it adopted.
    Its StatefulSet's pod comes back (a new pod, a new address): the inference Service's name resolves to
    it before it is ready, and once ready it takes new sessions through both gateways."""
    pods = [f"{FULLNAME}-inference-smollm2-{index}" for index in (0, 1)]
    chat = openai.OpenAI(
        base_url=f"{gateway(cluster)}/v1", api_key="not-needed", max_retries=0, timeout=ANSWER_TIMEOUT_S
    )
    miss = 'petals_chat_conversation_lookups_total{result="miss"}'
    misses = {pod: replica_metric(cluster, pod, miss) for pod in pods}
    runs = conversing_runs(cluster, chat)
    assert {run.holder() for run in runs if run.holder()} == set(pods), "v1 sessions on both replicas"
    holders = [pod for pod in pods if replica_metric(cluster, pod, miss) > misses[pod]]
    assert len(holders) == 1, misses
    stopped, survivor = holders[0], next(pod for pod in pods if pod != holders[0])  # the chat moves
    adopted = 'petals_chat_session_handovers_total{result="adopted"}'
    adopted_before = replica_metric(cluster, survivor, adopted)

    started = time.monotonic()
    try:
        states = converse_around(runs, lambda: cluster.stop_pod(stopped))
        print(f"\n{stopped} stopped while {len(runs)} sessions conversed ({time.monotonic() - started:.0f} s)")
        for run in runs:
            run.end()
    finally:  # its log, then the pod back as its StatefulSet's controller recreates it (also when a check failed)
        logs = cluster.logs_by_name(f"{stopped}-inference", 400)
        (ARTIFACTS / f"{stopped}-inference.stopped.log").write_text(logs)
        cluster.start_pod(stopped)
        service = f"{FULLNAME}-inference.{NAMESPACE}.svc.cluster.local"  # headless, publishNotReadyAddresses
        resolved = cluster.resolve(f"{FULLNAME}-gateway-0-gateway", service)
        recreated = cluster.pod(stopped)
        ready_already = recreated.containers[0].readiness.check(recreated.ip)
        cluster.wait_ready(READY_TIMEOUT_S)
    assert all(state["ExitCode"] != 137 and not state["OOMKilled"] for state in states.values()), states
    handed = re.findall(r"handed over (\d+) sessions to .*; (\d+) could not be", logs)
    assert len(handed) == 1 and int(handed[0][0]) >= 2 and handed[0][1] == "0", logs[-2000:]
    assert replica_metric(cluster, survivor, adopted) - adopted_before == int(handed[0][0])
    assert resolved == {pod.ip for pod in cluster.pods if "-inference-" in pod.name}  # the new address too
    assert not ready_already, "it was ready already: resolved too late to tell"
    for index in (0, 1):
        takes_new_sessions(gateway(cluster, index), stopped)

    uninterrupted = GatewayReference(Api(gateway(cluster, 1), ANSWER_TIMEOUT_S), chat)
    for run in runs:
        assert run.text() == run.reference(uninterrupted), run


def test_the_ui_serves_the_chat_page(cluster):
    for index in (0, 1):
        status, text = http("GET", cluster.url(f"{FULLNAME}-ui-{index}") + "/")
        assert status == 200 and "Petals Chat" in text


INSIDE = r"""
import json, os
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
out |= {k: status[k].strip() for k in ("CapEff", "CapBnd", "NoNewPrivs", "Seccomp")}
try:
    open("/root-write-test", "w")
    out["root_writable"] = True
except OSError:
    out["root_writable"] = False
open("/tmp/write-test", "w").write("x")
for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
    if os.path.exists(path):
        out["memory_limit"] = open(path).read().strip()
models = "/models"
if os.path.isdir(models):
    weights = {d: os.path.join(models, d, "model.safetensors") for d in sorted(os.listdir(models))}
    out["models"] = {d: len(open(path, "rb").read(1 << 20)) for d, path in weights.items()}
# host bytecode and caches kept out by .dockerignore (the images never write bytecode: PYTHONDONTWRITEBYTECODE)
out["app_junk"] = [
    os.path.join(d, n) for d, dirs, files in os.walk("/app") for n in dirs + files
    if n in ("__pycache__", ".pytest_cache", ".ruff_cache", ".venv", ".git") or n.endswith((".pyc", ".pyo"))
]
seed = "/var/run/petals-swarm/seed"
if os.path.exists(seed):
    out["seed_bytes"] = len(open(seed, "rb").read())
print(json.dumps(out))
"""


def test_security_context_memory_and_volumes_are_honoured_inside(cluster):
    for pod in cluster.pods:
        for c in pod.containers:
            # Seen once (2026-12-02): the probe had printed its answer, but podman exec did not return within
            # 60 s while an image build (the GPU images) wrote a multi-GB layer to the same image store.
            result = cluster.exec(c.podman_name, "python", "-c", INSIDE, timeout=600)
            assert result.returncode == 0, (c.podman_name, result.stderr[-1000:])
            seen = json.loads(result.stdout.strip().splitlines()[-1])
            assert (seen["uid"], seen["gid"]) == (10001, 10001), (c.podman_name, seen)
            assert 10001 in seen["groups"], seen  # fsGroup
            assert seen["CapEff"] == seen["CapBnd"] == "0000000000000000", (c.podman_name, seen)
            assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2", (c.podman_name, seen)
            assert seen["root_writable"] is False, c.podman_name
            assert seen["app_junk"] == [], (c.podman_name, seen["app_junk"][:10])
            limit = c.args[c.args.index("--memory") + 1]
            assert seen.get("memory_limit") == limit, (c.podman_name, seen)
            if "-inference-" in pod.name or "-swarm-" in pod.name:
                assert sorted(seen["models"]) == ["smollm2-135m-instruct", "tiny-bloom"], seen
                assert all(seen["models"].values()), seen  # uid 10001 reads the weights
                assert seen["seed_bytes"] >= 16, seen


def test_every_pod_stops_gracefully_within_its_grace_period(cluster):
    """Last: SIGTERM to every pod (podman pod stop with the pod's terminationGracePeriodSeconds)."""
    started = time.monotonic()
    states = cluster.stop()
    took = time.monotonic() - started
    (ARTIFACTS / "stop.json").write_text(json.dumps({"seconds": took, "states": states}, indent=2))
    for name, state in states.items():
        assert state["Status"] in ("exited", "stopped"), (name, state)
        assert not state["OOMKilled"], (name, state)
        assert state["ExitCode"] != 137, f"{name} was killed after its grace period: {state}"


def server_zero_addresses(harness: PodHarness, key: str) -> str:
    """The line where server 0 of a model's swarm logs its own multiaddrs (with its peer id)."""
    logs = harness.logs_by_name(f"{FULLNAME}-swarm-{key}-0-0-petals-server", 100000)
    return next((line for line in logs.splitlines() if "Running a server on" in line), "")


def test_a_redeploy_with_the_kept_seed_comes_back_ready_as_the_same_swarm(cluster):
    """After the stop: what `helm upgrade` keeps, and what a restart of every pod gives. The pods of a second
    render, which names the first render's Secret as swarm.seedSecret (the seed that `lookup` keeps on an
    upgrade), are started afresh (new containers, empty emptyDirs) with that same Secret, and the first
    render's handover token (what `lookup` keeps of it on an upgrade). They become
    ready with no restarts, server 0 of each model comes back under the same peer id (derived from the seed),
    and SmolLM2 answers again. A cluster's `lookup` itself is not exercised (no API server here)."""
    secret_name = f"{FULLNAME}-swarm-seed"
    secret = next(d for d in cluster.docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret_name)
    seed = base64.b64decode(secret["data"]["seed"])
    expected = {key: swarm_identity.peer_id(seed, key) for key in ("smollm2", "tiny-bloom")}
    before = {key: server_zero_addresses(cluster, key) for key in expected}
    for key, peer in expected.items():
        assert f"/p2p/{peer}" in before[key], (key, before[key])
    (ARTIFACTS / "first-deploy").mkdir(exist_ok=True)
    for pod in cluster.pods:
        for c in pod.containers:
            (ARTIFACTS / "first-deploy" / f"{c.podman_name}.log").write_text(cluster.logs(c, 400))
    cluster.remove()

    docs = render_chart({"swarm": {"seedSecret": secret_name}}, release=RELEASE, namespace=NAMESPACE)
    handover = f"{FULLNAME}-handover"  # the replicas' handover token, which `lookup` keeps on an upgrade too
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [handover]
    kept = [d for d in cluster.docs if d["kind"] == "Secret" and d["metadata"]["name"] == handover]
    docs = [d for d in docs if d["kind"] != "Secret"] + kept
    workloads = lambda ds: {d["metadata"]["name"]: d["spec"] for d in ds if d["kind"] in ("Deployment", "StatefulSet")}  # noqa: E731
    assert workloads(docs) == workloads(cluster.docs)  # the upgrade's render: nothing for Kubernetes to roll
    redeploy_dir = ARTIFACTS / "redeploy"
    redeploy_dir.mkdir(exist_ok=True)
    with PodHarness([*docs, secret], namespace=NAMESPACE) as again:
        try:
            again.plan()
            again.start()
            ready_s = again.wait_ready(READY_TIMEOUT_S)
            print(f"\nre-deployed: all {len(again.pods)} pods ready {ready_s:.0f} s after start")
            containers = [c for p in again.pods for c in p.containers]
            assert [c.restarts for c in containers] == [0] * len(containers), again.events
            for key, peer in expected.items():
                after = server_zero_addresses(again, key)
                assert f"/p2p/{peer}" in after, (key, after)
            body = {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0,
                "max_tokens": 20,
            }
            # The pods are ready, but the gateway learns its replicas' readiness by polling them (every 2 s):
            # ask once it sees every replica ready (seen: a 503 when asked the moment the last one turned ready).
            deadline = time.monotonic() + 60
            while True:
                status, text = http("GET", again.url(f"{FULLNAME}-gateway-0") + "/readyz")
                replicas = json.loads(text).get("replicas", {}) if status == 200 else {}
                if replicas and all(r["ready"] for r in replicas.values()):
                    break
                assert time.monotonic() < deadline, f"the gateway never saw every replica ready: {text[:1000]}"
                time.sleep(1)
            answer = get_json(again.url(f"{FULLNAME}-gateway-0") + "/v1/chat/completions", body)
            assert "Paris" in answer["choices"][0]["message"]["content"], answer
        finally:
            (redeploy_dir / "events.txt").write_text("\n".join(again.events) + "\n" + summary(again.pods) + "\n")
            for pod in again.pods:
                for c in pod.containers:
                    (redeploy_dir / f"{c.podman_name}.log").write_text(again.logs(c, 400))


def test_harness_refuses_what_it_cannot_honour():
    docs = render_chart(release=RELEASE, namespace=NAMESPACE)
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    )
    with PodHarness(docs, namespace=NAMESPACE) as harness, pytest.raises(HarnessError, match="not supported"):
        harness.plan()
