#!/usr/bin/env bash
# The first contact of a user, proven: a fresh clone of this repository's HEAD set up and run as
# on a machine that has only the public registries. No PIP_* variable and no pip configuration
# file (PIP_CONFIG_FILE=/dev/null), a new HOME (no pip cache, no user configuration), a new
# virtual environment; then `make setup`, `import torch`, `make run`, and one chat answer through
# the gateway. Prints the setup's time, what it downloaded and the disk it took.
#
# Kept from the caller's environment: PATH and the Python it finds (resolved to a path first),
# and the machine's TLS trust (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS for npm: where PyPI and npm are reached through
# a TLS proxy, its CA is there), which is not pip's configuration.
# Options (environment): CLEAN_SETUP_DIR (default: a new folder under /tmp, removed afterwards
# unless KEEP=1), PUBLIC_PORT (default 5600: the stack's ports are PUBLIC_PORT..PUBLIC_PORT+12).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${CLEAN_SETUP_DIR:-$(mktemp -d /tmp/petals-clean-setup.XXXXXX)}"
PORT="${PUBLIC_PORT:-5600}"
PYTHON_BIN="$(python3 -c 'import sys; print(sys.executable)')"
RUN_PID=""

log() { echo "[clean-setup] $*" >&2; }

cleanup() {
    if [[ -n "$RUN_PID" ]] && kill -0 "$RUN_PID" 2>/dev/null; then
        log "stopping make run (pid $RUN_PID)"
        kill -TERM -- "-$RUN_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$RUN_PID" 2>/dev/null || true
    fi
    if [[ "${KEEP:-0}" != 1 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Bytes received by every network interface but loopback.
received_bytes() { cat $(ls -d /sys/class/net/*/ | grep -v '/lo/' | sed 's|$|statistics/rx_bytes|') | paste -sd+ | bc; }

# The clean environment: nothing of the caller's but the above.
clean() {
    env -i HOME="$WORK/home" PATH="$PATH" LANG=C.UTF-8 TERM=dumb \
        PIP_CONFIG_FILE=/dev/null \
        ${SSL_CERT_FILE:+SSL_CERT_FILE="$SSL_CERT_FILE"} \
        ${REQUESTS_CA_BUNDLE:+REQUESTS_CA_BUNDLE="$REQUESTS_CA_BUNDLE"} \
        ${NODE_EXTRA_CA_CERTS:+NODE_EXTRA_CA_CERTS="$NODE_EXTRA_CA_CERTS"} \
        PYTHON="$PYTHON_BIN" "$@"
}

mkdir -p "$WORK/home"
log "fresh clone of $(git -C "$ROOT" rev-parse --short HEAD) in $WORK/repo; Python $PYTHON_BIN"
git clone --quiet "$ROOT" "$WORK/repo"
cd "$WORK/repo"

before=$(received_bytes)
start=$SECONDS
clean make setup PYTHON="$PYTHON_BIN" 2>&1 | tee "$WORK/setup.log" | grep -v '^WARNING' >&2
setup_s=$((SECONDS - start))
downloaded_mb=$((($(received_bytes) - before) / 1000000))
venv_mb=$(du -sm .venv | cut -f1)
models_mb=$(du -sm .cache | cut -f1)
grep -q '^\[setup\] torch: ' "$WORK/setup.log" || { log "the setup did not say which torch it chose"; exit 1; }
log "make setup took ${setup_s} s, downloaded ${downloaded_mb} MB; .venv ${venv_mb} MB, .cache ${models_mb} MB"

clean .venv/bin/python -c 'import torch; x = torch.ones(2, 2); print("[clean-setup] torch", torch.__version__, "computes", float((x @ x).sum()))' >&2

log "make run on port $PORT"
setsid env -i HOME="$WORK/home" PATH="$PATH" LANG=C.UTF-8 PIP_CONFIG_FILE=/dev/null PUBLIC_PORT="$PORT" \
    make run PYTHON="$PYTHON_BIN" >"$WORK/run.log" 2>&1 &
RUN_PID=$!
for _ in $(seq 600); do
    grep -qs "Petals Chat is up" "$WORK/run.log" && break
    kill -0 "$RUN_PID" 2>/dev/null || { cat "$WORK/run.log" >&2; log "make run exited"; exit 1; }
    sleep 1
done
grep -q "Petals Chat is up" "$WORK/run.log" || { tail -30 "$WORK/run.log" >&2; log "make run did not come up"; exit 1; }

answer=$(curl -sS --max-time 300 "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 24}')
text=$(printf '%s' "$answer" | "$PYTHON_BIN" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])') \
    || { log "no chat answer: $answer"; exit 1; }
[[ -n "$text" ]] || { log "an empty chat answer: $answer"; exit 1; }

echo "clean setup: $(grep '^\[setup\] torch: ' "$WORK/setup.log" | head -n1)"
echo "clean setup: make setup took ${setup_s} s, downloaded ${downloaded_mb} MB; .venv ${venv_mb} MB, .cache ${models_mb} MB"
echo "clean setup: make run answered: ${text}"
echo "clean setup: passed"
