"""``bench.replicas.stop`` ends a server's whole process group: a member that ignores SIGTERM
(as an engine process that hangs would) is killed, not left behind. (The vLLM suite starts
real replicas with it: tests/adapters/vllm/test_replicas.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from bench import replicas

# The leader starts a child that ignores SIGTERM, says its pid, and waits.
LEADER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                          "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "print('ready', flush=True); time.sleep(600)"],
                         stdout=subprocess.PIPE)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    leader = subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE,
                              start_new_session=True)
    assert leader.stdout is not None
    child = psutil.Process(int(leader.stdout.readline()))
    replica = replicas.Replica(leader, "http://127.0.0.1:1", tmp_path / "log",
                               [psutil.Process(leader.pid), child])

    assert replicas.stop(replica, grace=30) == []
    assert leader.returncode is not None
    try:
        assert child.status() == psutil.STATUS_ZOMBIE  # killed, its reaper not yet there
    except psutil.NoSuchProcess:
        pass
    leader.stdout.close()


def test_each_replica_engine_gets_a_cpu_of_its_own_in_turn() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert replicas.spread_cores(1) == [None]  # one replica: vLLM's own binding
    cores = replicas.spread_cores(len(cpus) + 1)
    assert cores[: len(cpus)] == [str(cpu) for cpu in cpus]  # side by side, then round again
    assert cores[-1] == str(cpus[0])
