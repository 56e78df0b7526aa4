"""services.common.processes.lifeline: a spawned group dies with its starter, however the starter ends, and
the starter's watchdog does not outlive it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from client.probes import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
WATCHDOG = "-m services.common.processes.lifeline"
# The starter spawns a shell with a child of its own (a group of two) and prints the group's id;
# with "fork" it forks a process that outlives it in a session of its own (a fork must not keep
# the watchdog's pipe open) and prints its id (else 0); on a line from the test it stops the group
# on purpose ("stop") or not, and exits normally.
STARTER = """
import os, sys, time
from services.common.processes.lifeline import kill_group, spawn
child = spawn(["sh", "-c", "sleep 300 & wait"])
print(child.pid, flush=True)
fork = os.fork() if "fork" in sys.argv else 0
if "fork" in sys.argv and fork == 0:
    os.setsid()
    time.sleep(300)
    os._exit(0)
print(fork, flush=True)
sys.stdin.readline()
if "stop" in sys.argv:
    kill_group(child.pid)
    child.wait()
"""


def processes() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, cmdline) of every running process (zombies aside)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if fields[0] not in "ZX":
                found.append((int(proc.name), int(fields[1]), int(fields[2]), cmdline))
    return found


def group_alive(pgid: int) -> bool:
    return any(group == pgid for _, _, group, _ in processes())


def pid_alive(pid: int) -> bool:
    return any(found == pid for found, _, _, _ in processes())


@contextlib.contextmanager
def starter(*args: str):
    """The starter, its spawned group (two processes) and its watchdog, all running; nothing survives the test."""
    process = subprocess.Popen(
        [sys.executable, "-c", STARTER, *args],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pgid = fork = None
    try:
        pgid = int(process.stdout.readline())
        fork = int(process.stdout.readline()) or None
        watchdogs: list[int] = []

        def up() -> bool:
            table = processes()
            watchdogs[:] = [pid for pid, ppid, _, cmd in table if ppid == process.pid and WATCHDOG in cmd]
            return len(watchdogs) == 1 and sum(group == pgid for _, _, group, _ in table) == 2

        assert wait_until(up, 10), processes()
        yield process, pgid, watchdogs[0]
    finally:
        for group in (process.pid, pgid, fork):
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.killpg(group, signal.SIGKILL)
        process.wait(10)
        process.stdin.close()
        process.stdout.close()


@pytest.mark.parametrize("args", [(), ("fork",)], ids=["plain", "starter-forked"])
def test_a_sigkilled_starter_takes_the_whole_group_with_it(args):
    with starter(*args) as (process, pgid, watchdog):
        os.kill(process.pid, signal.SIGKILL)  # the starter alone (its fork lives on): no clean-up possible
        assert wait_until(lambda: not group_alive(pgid), 10), "the spawned group outlived its starter"
        assert wait_until(lambda: not pid_alive(watchdog), 10), "the watchdog outlived its starter"


@pytest.mark.parametrize("args", [(), ("stop",)], ids=["left-running", "stopped-first"])
def test_a_normal_exit_ends_the_group_and_the_watchdog(args):
    with starter(*args) as (process, pgid, watchdog):
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.wait(10) == 0
        assert wait_until(lambda: not group_alive(pgid), 10)
        assert wait_until(lambda: not pid_alive(watchdog), 10)
