"""Starting and stopping child processes (`celery_serve._runtime.launcher`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from celery_serve._runtime.launcher import ProcessGroup, free_port, spawn
from tests.conftest import wait_until

SLEEPER = [sys.executable, "-c", "import signal; signal.pause()"]  # runs until signalled


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_child_started_from_a_short_lived_thread_outlives_the_thread() -> None:
    group = ProcessGroup()
    thread = threading.Thread(target=group.start, args=("sleeper", SLEEPER))
    thread.start()
    thread.join()
    try:
        time.sleep(0.2)  # the parent-death signal, if any, is sent as the thread exits
        assert group.processes[0].proc.poll() is None
    finally:
        group.stop()
    assert group.processes == []


def test_a_child_dies_with_the_process_that_started_it() -> None:
    starter = (
        "import signal; from celery_serve._runtime.launcher import spawn; "
        f"p = spawn({SLEEPER!r}); print(p.pid, flush=True); signal.pause()"
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()

    def child_gone() -> bool:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{child_pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] == "Z"  # exited, waiting to be reaped

    wait_until(child_gone, timeout_s=10, what=f"child {child_pid} to die with its parent")


def test_spawn_raises_what_popen_raises() -> None:
    with pytest.raises(FileNotFoundError):
        spawn(["/nonexistent/celery-serve-test-binary"])


def test_group_stops_in_reverse_order_and_reports_the_dead() -> None:
    group = ProcessGroup()
    first = group.start("first", SLEEPER)
    quick = group.start("quick", [sys.executable, "-c", "pass"])
    wait_until(lambda: quick.proc.poll() is not None, timeout_s=30, what="the quick process to exit")
    assert [p.name for p in group.dead()] == ["quick"]
    group.stop({"first"})
    assert first.proc.returncode == -signal.SIGTERM
    assert [p.name for p in group.processes] == ["quick"]
