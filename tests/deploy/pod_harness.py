"""Run the rendered Helm chart's pods with podman, as a kubelet would, without Kubernetes.

No Kubernetes control plane can be installed on these machines, and ``podman kube play`` drops
StatefulSets, Services and probes (see docs/testing.md, Deployment test). This harness takes the manifests
``helm template`` renders (through helm-python-sdk) and runs every pod of every Deployment and
StatefulSet: one podman pod per replica on a container network the harness creates, honouring:

- the image (from local storage only: the images scripts/build_images.sh built), command
  (ENTRYPOINT) and args (CMD), env with fieldRefs resolved (metadata.name, metadata.namespace);
- the pod's and containers' securityContext: runAsUser/runAsGroup, fsGroup (supplementary group,
  owner of Secret volumes), readOnlyRootFilesystem (``--read-only --read-only-tmpfs=false``: only
  the pod's own volumes are writable), capabilities.drop, allowPrivilegeEscalation=false
  (no-new-privileges), seccomp RuntimeDefault (podman's default profile), privileged=false;
- volumes: emptyDir (a tmpfs per pod and volume, sizeLimit as its size, mode 1777) and Secret
  (the chart's rendered Secret, its items and defaultMode, group fsGroup), read-only mounts;
- resources.limits.memory (``--memory``), terminationGracePeriodSeconds (``--stop-timeout``);
- DNS: each pod's hostname is its name; a StatefulSet pod answers as
  ``<pod>.<serviceName>.<namespace>.svc.cluster.local``, every pod a Service selects as
  ``<service>[.<namespace>[.svc[.cluster.local]]]`` (network aliases, resolved by aardvark-dns): a
  Service name resolves to every selected pod's address from the pod's start, ready or not, as a
  headless Service with ``publishNotReadyAddresses`` does, and a stopped pod's address leaves it;
- replicas: a StatefulSet's or Deployment's spec.replicas (pods <name>-0..N-1) or, when an HPA
  (``autoscaling/v2``) or a KEDA ScaledObject targets it, its minimum (minReplicas, minReplicaCount;
  at least 1), what an autoscaler keeps with no load;
- startup, readiness and liveness probes (httpGet and tcpSocket, on named or numbered ports):
  polled from the host to the pod's address, as a kubelet does, until every pod is ready;
- restartPolicy Always: a container that exits is started again (counted in ``restarts``);
- a pod deleted and recreated by its controller (``stop_pod`` then ``start_pod``): SIGTERM to its
  containers within its grace period, then a new pod of the same name and DNS names, new containers,
  empty emptyDirs and a new address.

What it does not do: API-server admission (Pod Security admission, schema defaults), scheduling
(requests, node selectors, tolerations), CPU shares, NetworkPolicy, scaling by an HPA or KEDA (only
their minimum runs), PDBs, Ingress, ClusterIP port mapping (a Service name resolves to its pods'
addresses; the chart's pods only call headless Services), leaving not-ready pods out of a Service
without ``publishNotReadyAddresses`` (every selected pod resolves, ready or not),
ServiceMonitor/PrometheusRule.

The network is ``--internal``: no route out of it (and podman publishes no ports on an internal
network). The host reaches the pods on it at their addresses, as a node does; that network is the
only place any traffic goes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "petals-chat"
IMAGES_CACHE = Path(os.environ.get("IMAGES_CACHE", REPO_ROOT / ".cache" / "images"))
CONTAINERS_CONF = """\
# podman on these machines (shared/containers.md): crun fails on cgroup v1 hybrid mode, and the host
# refuses podman's default nofile/nproc ulimits.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


class HarnessError(RuntimeError):
    """A manifest the harness cannot run faithfully, or a pod that failed."""


def render_chart(values: dict | None = None, release: str = "chat", namespace: str = "llm") -> list[dict]:
    """Every manifest ``helm template`` renders for ``values`` (parsed; NOTES.txt left out).

    Rendered in a child process: helm-python-sdk loads Go's runtime, which takes over SIGINT and
    SIGTERM in its process, and the harness must stay interruptible to remove what it made.
    """
    script = (
        "import json, sys, helm_python\n"
        "values, chart, release, namespace = json.loads(sys.stdin.read())\n"
        "with helm_python.Chart.load(chart) as c:\n"
        "    print(json.dumps(c.render(values, name=release, namespace=namespace)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps([values or {}, str(CHART), release, namespace]),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise HarnessError(f"rendering the chart failed: {result.stderr.strip()[-2000:]}")
    out = json.loads(result.stdout)
    return [
        doc for path, text in out.items() if not path.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc
    ]


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (Ki, Mi, Gi, k, M, G or plain bytes) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|[kmgt])?", str(quantity))
    if not match:
        raise HarnessError(f"unsupported memory quantity {quantity!r}")
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "K": 10**3, "M": 10**6}
    units |= {"G": 10**9, "T": 10**12, "m": 10**6, "g": 10**9, "t": 10**12}
    return int(float(match[1]) * units.get(match[2] or "", 1))


@dataclass
class Probe:
    """A probe of a container: httpGet (path) or tcpSocket, on a container port."""

    kind: str  # "http" or "tcp"
    port: int
    path: str = "/"
    period_s: float = 10.0
    timeout_s: float = 1.0
    failure_threshold: int = 3

    @classmethod
    def from_spec(cls, spec: dict | None, ports: dict[str, int]) -> Probe | None:
        if not spec:
            return None
        for kind, key in (("http", "httpGet"), ("tcp", "tcpSocket")):
            if key in spec:
                port = spec[key]["port"]
                port = ports[port] if isinstance(port, str) else int(port)
                return cls(
                    kind, port, spec[key].get("path", "/"), float(spec.get("periodSeconds", 10)),
                    float(spec.get("timeoutSeconds", 1)), int(spec.get("failureThreshold", 3)),
                )  # fmt: skip
        raise HarnessError(f"unsupported probe {spec}")

    def check(self, ip: str) -> bool:
        """One probe of the pod at ``ip``: 2xx/3xx (http) or an accepted connection (tcp)."""
        address = (ip, self.port)
        if self.kind == "tcp":
            try:
                with socket.create_connection(address, timeout=self.timeout_s):
                    pass
                return True
            except OSError:
                return False
        try:
            url = f"http://{address[0]}:{address[1]}{self.path}"
            with urllib.request.urlopen(url, timeout=max(self.timeout_s, 3.0)) as response:
                return 200 <= response.status < 400
        except (urllib.error.URLError, OSError):
            return False


@dataclass
class Container:
    name: str
    podman_name: str
    args: list[str]  # `podman create` arguments
    ports: list[int]
    startup: Probe | None
    readiness: Probe | None
    liveness: Probe | None
    started: bool = False
    ready: bool = False
    restarts: int = 0


@dataclass
class Pod:
    """One replica of a Deployment or StatefulSet."""

    name: str
    owner: str  # "StatefulSet/<name>" or "Deployment/<name>"
    labels: dict[str, str]
    aliases: list[str]
    grace_s: int
    ip: str = ""
    containers: list[Container] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.containers)


class PodHarness:
    """Runs the pods of rendered manifests with podman; a context manager that removes all it made."""

    def __init__(self, docs: list[dict], *, state_dir: Path | None = None, namespace: str | None = None) -> None:
        self.docs = docs
        self.namespace = namespace or next(d["metadata"].get("namespace") for d in docs if d["kind"] == "Deployment")
        self.run_id = uuid.uuid4().hex[:8]
        self.network = f"petals-chat-test-{self.run_id}"
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="pod-harness-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "containers.conf").write_text(CONTAINERS_CONF)
        self.pods: list[Pod] = []
        self._network_made = False
        self.events: list[str] = []

    # ---- podman ----------------------------------------------------------------------------------
    def podman(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [
            "podman", "--root", str(IMAGES_CACHE / "storage-overlay"), "--runroot", str(IMAGES_CACHE / "run"),
            "--storage-driver", "overlay", *args,
        ]  # fmt: skip
        env = {**os.environ, "CONTAINERS_CONF": str(self.state_dir / "containers.conf")}
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise HarnessError(
                f"podman {' '.join(args[:3])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}"
            )
        return result

    # ---- planning --------------------------------------------------------------------------------
    def _kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def _replicas(self, workload: dict) -> int:
        """An autoscaler's minimum (at least 1) where one targets ``workload``, else its spec.replicas (1)."""
        minimum = self._autoscaler_minimum(workload)
        if minimum is not None:
            return minimum
        return int(workload["spec"].get("replicas", 1))

    def _autoscaler_minimum(self, workload: dict) -> int | None:
        """The minimum replicas of the HPA or KEDA ScaledObject that targets ``workload``; None if none does.
        A ScaledObject's target kind defaults to Deployment and its minReplicaCount to 0 (run 1 here)."""
        scalers = [(hpa["spec"], "minReplicas", 1) for hpa in self._kind("HorizontalPodAutoscaler")]
        scalers += [(so["spec"], "minReplicaCount", 0) for so in self._kind("ScaledObject")]
        for spec, key, default in scalers:
            ref = spec["scaleTargetRef"]
            if ref.get("kind", "Deployment") == workload["kind"] and ref["name"] == workload["metadata"]["name"]:
                return max(1, int(spec.get(key, default)))
        return None

    def _service_aliases(self, labels: dict[str, str]) -> list[str]:
        aliases = []
        for service in self._kind("Service"):
            selector = service["spec"].get("selector") or {}
            if selector and selector.items() <= labels.items():
                name = service["metadata"]["name"]
                ns = self.namespace
                aliases += [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]
        return aliases

    def _secret_dir(self, pod: str, volume: dict, fs_group: int | None) -> Path:
        spec = volume["secret"]
        secrets = [s for s in self._kind("Secret") if s["metadata"]["name"] == spec["secretName"]]
        if not secrets:
            raise HarnessError(f"pod {pod}: Secret {spec['secretName']} is not in the rendered chart")
        data = {k: base64.b64decode(v) for k, v in (secrets[0].get("data") or {}).items()}
        data |= {k: v.encode() for k, v in (secrets[0].get("stringData") or {}).items()}
        items = spec.get("items") or [{"key": k, "path": k} for k in data]
        folder = self.state_dir / "volumes" / pod / volume["name"]
        folder.mkdir(parents=True)
        for item in items:
            path = folder / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[item["key"]])
            path.chmod(int(item.get("mode", spec.get("defaultMode", 0o644))))
            if fs_group is not None:
                os.chown(path, 0, fs_group)
        folder.chmod(0o755)
        return folder

    def plan(self) -> list[Pod]:
        """The pods to run (one per replica), with their podman arguments."""
        pods = []
        for workload in self._kind("Deployment") + self._kind("StatefulSet"):
            owner = f"{workload['kind']}/{workload['metadata']['name']}"
            template = workload["spec"]["template"]
            labels = template["metadata"].get("labels", {})
            for index in range(self._replicas(workload)):
                name = f"{workload['metadata']['name']}-{index}"
                aliases = self._service_aliases(labels)
                if workload["kind"] == "StatefulSet":
                    fqdn = f"{name}.{workload['spec']['serviceName']}.{self.namespace}.svc.cluster.local"
                    aliases = [fqdn, fqdn.removesuffix(".cluster.local"), *aliases]
                pods.append(self._plan_pod(name, owner, labels, aliases, template["spec"]))
        self.pods = pods
        return pods

    def _plan_pod(self, name: str, owner: str, labels: dict, aliases: list[str], spec: dict) -> Pod:
        unsupported = {"initContainers", "hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"} & set(spec)
        if unsupported:
            raise HarnessError(f"pod {name}: unsupported pod fields {sorted(unsupported)}")
        pod_sc = spec.get("securityContext", {})
        pod = Pod(name, owner, labels, aliases, int(spec.get("terminationGracePeriodSeconds", 30)))
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            sc = {**pod_sc, **c.get("securityContext", {})}
            if sc.get("privileged"):
                raise HarnessError(f"pod {name}: privileged containers are not run")
            args = ["--pod", name, "--name", f"{name}-{c['name']}", "--pull", "never", "--restart", "no"]
            user = sc.get("runAsUser")
            if user is not None:
                args += ["--user", f"{user}:{sc.get('runAsGroup', user)}"]
            elif sc.get("runAsNonRoot"):
                raise HarnessError(f"pod {name}: runAsNonRoot without runAsUser is not checked here")
            if pod_sc.get("fsGroup") is not None:
                args += ["--group-add", str(pod_sc["fsGroup"])]
            if sc.get("readOnlyRootFilesystem"):
                args += ["--read-only", "--read-only-tmpfs=false"]
            for cap in sc.get("capabilities", {}).get("drop", []):
                args += ["--cap-drop", cap]
            for cap in sc.get("capabilities", {}).get("add", []):
                args += ["--cap-add", cap]
            if sc.get("allowPrivilegeEscalation") is False:
                args += ["--security-opt", "no-new-privileges"]
            seccomp = sc.get("seccompProfile", {}).get("type")
            if seccomp not in (None, "RuntimeDefault"):
                raise HarnessError(f"pod {name}: seccomp profile {seccomp} is not supported here")
            limits = c.get("resources", {}).get("limits", {})
            if "memory" in limits:
                args += ["--memory", str(memory_bytes(limits["memory"]))]
            args += ["--stop-timeout", str(pod.grace_s)]
            for env in c.get("env", []):
                args += ["--env", f"{env['name']}={self._env_value(name, env)}"]
            for mount in c.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "emptyDir" in volume:
                    size = (volume["emptyDir"] or {}).get("sizeLimit")
                    options = "rw,nosuid,nodev,mode=1777" + (f",size={memory_bytes(size)}" if size else "")
                    args += ["--tmpfs", f"{mount['mountPath']}:{options}"]
                elif "secret" in volume:
                    folder = self._secret_dir(name, volume, pod_sc.get("fsGroup"))
                    args += ["--volume", f"{folder}:{mount['mountPath']}:ro"]
                else:
                    raise HarnessError(f"pod {name}: volume type of {mount['name']} is not supported")
            if c.get("command"):
                args += ["--entrypoint", json.dumps(c["command"])]
            args += [c["image"], *c.get("args", [])]
            named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            pod.containers.append(
                Container(
                    c["name"],
                    f"{name}-{c['name']}",
                    args,
                    [p["containerPort"] for p in c.get("ports", [])],
                    Probe.from_spec(c.get("startupProbe"), named),
                    Probe.from_spec(c.get("readinessProbe"), named),
                    Probe.from_spec(c.get("livenessProbe"), named),
                )
            )
        return pod

    def _env_value(self, pod: str, env: dict) -> str:
        if "value" in env:
            value = str(env["value"])
            if "$(" in value:
                raise HarnessError(f"pod {pod}: $(VAR) expansion in {env['name']} is not supported")
            return value
        ref = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        fields = {"metadata.name": pod, "metadata.namespace": self.namespace}
        if ref not in fields:
            raise HarnessError(f"pod {pod}: env {env['name']} from {env.get('valueFrom')} is not supported")
        return fields[ref]

    # ---- running ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the network and every pod, then start every container (all at once, as Kubernetes does)."""
        if not self.pods:
            self.plan()
        self.podman("network", "create", "--internal", self.network)
        self._network_made = True
        for pod in self.pods:
            self._create(pod)
        for pod in self.pods:
            self._run(pod)

    def _create(self, pod: Pod) -> None:
        args = ["pod", "create", "--name", pod.name, "--hostname", pod.name, "--network", self.network]
        for alias in pod.aliases:
            args += ["--network-alias", alias]
        self.podman(*args)
        for container in pod.containers:
            self.podman("create", *container.args)

    def _run(self, pod: Pod) -> None:
        self.podman("pod", "start", pod.name)
        infra = self.podman("pod", "inspect", "--format", "{{.InfraContainerID}}", pod.name).stdout.strip()
        address = '{{(index .NetworkSettings.Networks "NET").IPAddress}}'.replace("NET", self.network)
        pod.ip = self.podman("inspect", "--format", address, infra).stdout.strip()
        if not pod.ip:
            raise HarnessError(f"pod {pod.name} has no address on {self.network}")

    def pod(self, name: str) -> Pod:
        return next(p for p in self.pods if p.name == name)

    def stop_pod(self, name: str) -> dict[str, dict]:
        """Stop one pod as Kubernetes deletes it: SIGTERM to each container's main process, SIGKILL after
        the pod's grace period; container -> exit state. The containers stop first and the pod's infra
        container (its network namespace, as Kubernetes' pause container) last: ``podman pod stop`` alone
        takes the network away from containers still finishing their work (a replica handing over)."""
        pod = self.pod(name)
        self._stop(pod)
        for c in pod.containers:
            c.started = c.ready = False
        self.events.append(f"stopped pod {name}")
        return {c.podman_name: self._exit_state(c) for c in pod.containers}

    def start_pod(self, name: str) -> None:
        """Recreate a stopped pod as its controller would: the same name, DNS names and spec, new containers
        (empty emptyDirs, no restarts counted) and a new address. ``wait_ready`` then probes it."""
        pod = self.pod(name)
        self.podman("pod", "rm", "--force", "--time", "0", name, timeout=120)
        for c in pod.containers:
            c.started = c.ready = False
            c.restarts = 0
        self._create(pod)
        self._run(pod)
        self.events.append(f"recreated pod {name} at {pod.ip}")

    def resolve(self, container: str, name: str) -> set[str]:
        """The addresses ``name`` resolves to from inside ``container`` (which must have python)."""
        script = "import socket, sys; print(' '.join({a[4][0] for a in socket.getaddrinfo(sys.argv[1], None)}))"
        result = self.exec(container, "python", "-c", script, name)
        if result.returncode != 0:
            raise HarnessError(f"resolving {name} in {container} failed: {result.stderr.strip()[-500:]}")
        return set(result.stdout.split())

    def state(self, container: Container) -> dict:
        result = self.podman("inspect", "--format", "{{json .State}}", container.podman_name, check=False)
        return json.loads(result.stdout) if result.returncode == 0 else {}

    def wait_ready(self, timeout: float, poll_s: float = 2.0, max_restarts: int = 5) -> float:
        """Probe every container until all pods are ready; restart exited containers. Returns the seconds taken."""
        start = time.monotonic()
        next_probe: dict[str, float] = {}
        failures: dict[str, int] = {}
        while True:
            for pod in self.pods:
                for c in pod.containers:
                    now = time.monotonic()
                    if next_probe.get(c.podman_name, 0) > now:
                        continue
                    state = self.state(c)
                    if state.get("Status") in ("exited", "stopped"):
                        if c.restarts >= max_restarts:
                            raise HarnessError(
                                f"{c.podman_name} exited {c.restarts + 1} times (code {state.get('ExitCode')}):\n"
                                + self.logs(c, 40)
                            )
                        c.restarts += 1
                        c.started = c.ready = False
                        self.events.append(f"{now - start:.1f}s restart {c.podman_name} (exit {state.get('ExitCode')})")
                        self.podman("start", c.podman_name)
                        next_probe[c.podman_name] = now + min(10 * 2**c.restarts, 300)  # back-off
                        continue
                    if not c.started:
                        c.started = c.startup is None or c.startup.check(pod.ip)
                        if c.started:
                            self.events.append(f"{now - start:.1f}s started-probe {c.podman_name}")
                    if c.started:
                        was = c.ready
                        c.ready = c.readiness is None or c.readiness.check(pod.ip)
                        if c.ready != was:
                            self.events.append(
                                f"{now - start:.1f}s {'ready' if c.ready else 'unready'} {c.podman_name}"
                            )
                        if c.liveness is not None and not c.liveness.check(pod.ip):
                            failures[c.podman_name] = failures.get(c.podman_name, 0) + 1
                            if failures[c.podman_name] >= c.liveness.failure_threshold:
                                self.events.append(f"{now - start:.1f}s liveness failed: restart {c.podman_name}")
                                failures[c.podman_name] = 0
                                self.podman(
                                    "restart", "--time", str(pod.grace_s), c.podman_name, timeout=pod.grace_s + 60
                                )
                                c.restarts += 1
                                c.started = c.ready = False
                        else:
                            failures[c.podman_name] = 0
                    probe = c.readiness if c.started else c.startup
                    next_probe[c.podman_name] = now + min(poll_s, probe.period_s if probe else poll_s)
            if all(pod.ready for pod in self.pods):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                waiting = [c.podman_name for pod in self.pods for c in pod.containers if not c.ready]
                tails = "\n".join(f"--- {name}\n{self.logs_by_name(name, 15)}" for name in waiting)
                raise HarnessError(f"not ready after {timeout:.0f} s: {waiting}\n{tails}")
            time.sleep(0.5)

    def url(self, pod_name: str, container_port: int = 8080) -> str:
        """The base URL of a pod's container port, at the pod's address on the test network."""
        return f"http://{self.pod(pod_name).ip}:{container_port}"

    def pods_of(self, owner: str) -> list[Pod]:
        return [p for p in self.pods if p.owner == owner]

    def logs(self, container: Container, lines: int = 100) -> str:
        return self.logs_by_name(container.podman_name, lines)

    def logs_by_name(self, name: str, lines: int = 100) -> str:
        result = self.podman("logs", "--tail", str(lines), name, check=False)
        return (result.stdout + result.stderr).strip()

    def exec(self, container: str, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.podman("exec", container, *command, check=False, timeout=timeout)

    def stop(self) -> dict[str, dict]:
        """Stop every pod at once, each within its grace period (SIGTERM, then SIGKILL); container -> exit state."""

        def stop_one(pod: Pod) -> None:
            with contextlib.suppress(HarnessError, subprocess.TimeoutExpired):
                self._stop(pod)

        with ThreadPoolExecutor(max_workers=max(1, len(self.pods))) as pool:
            list(pool.map(stop_one, self.pods))
        return {c.podman_name: self._exit_state(c) for pod in self.pods for c in pod.containers}

    def _stop(self, pod: Pod) -> None:
        """The pod's containers within its grace period, then its infra container (see ``stop_pod``)."""
        containers = [c.podman_name for c in pod.containers]
        self.podman("stop", "--time", str(pod.grace_s), *containers, timeout=pod.grace_s + 60)
        self.podman("pod", "stop", "--time", "0", pod.name, timeout=60)

    def _exit_state(self, container: Container) -> dict:
        state = self.state(container)
        return {k: state.get(k) for k in ("Status", "ExitCode", "OOMKilled")}

    def remove(self) -> None:
        """Remove every pod, container and the network this harness made; keep nothing. A harness that
        only planned (its network is made first) made nothing in podman, and needs no podman to go."""
        if self._network_made:
            for pod in self.pods:
                self.podman("pod", "rm", "--force", "--time", "0", pod.name, check=False, timeout=120)
            self.podman("network", "rm", "--force", self.network, check=False)
        shutil.rmtree(self.state_dir if self._own_state_dir else self.state_dir / "volumes", ignore_errors=True)

    def __enter__(self) -> PodHarness:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def summary(pods: Iterable[Pod]) -> str:
    return "\n".join(f"{p.owner:50} {p.name:45} ready={p.ready}" for p in pods)
