"""Faults of `--nproc` jobs (issue 29, classes 11 and 13): a rank killed by a signal ends the job
in one `mlsae: error:` line naming the rank, the signal and how to continue (exit 2, no torchrun
traceback), the run folder resumable; bad input on every rank is one line too; a finished job
leaves no thread that could abort the process at exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest
from test_train import make_cache

from mlsae.cli.launch import job_failure, read_lines
from mlsae.core.dist import FAULT_ENV, injected_kill

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "MLSAE_DIST_TIMEOUT": "120",
}
ARGS = [
    "--batch-tokens",
    "64",
    "--expansion-factor",
    "2",
    "-k",
    "2",
    "--checkpoint-every",
    "3",
    "--max-steps",
    "12",
]


def mlsae(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlsae", *args],
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def mlsae_lines(stderr: str) -> list[str]:
    """The `mlsae:` lines of stderr (the progress bar's carriage returns split too)."""
    return [s.strip() for s in stderr.replace("\r", "\n").splitlines() if "mlsae:" in s]


@dataclass
class Failure:
    """torchrun's ProcessFailure: what `job_failure` reads of it."""

    exitcode: int
    timestamp: int = 100


def test_job_failure_names_the_killed_rank_not_the_ones_the_agent_stopped(tmp_path):
    # the agent SIGTERMs the survivors in the same second: the SIGKILL is the cause
    failures = {0: Failure(-signal.SIGTERM), 1: Failure(-signal.SIGKILL)}
    hint = "error: rank 0 of 2: Connection closed; continue with `mlsae train --resume r --nproc 2`"
    code, line = job_failure(failures, {0: hint}, 2)
    assert code == 2 and line.startswith("error: rank 1 of 2 was killed by signal 9 (SIGKILL")
    assert line.endswith("continue with `mlsae train --resume r --nproc 2`")
    code, line = job_failure({1: Failure(-signal.SIGSEGV)}, {}, 2)
    assert "rank 1 of 2 was killed by signal 11 (SIGSEGV: a crash)" in line and code == 2
    # an exit code: rank 0's own line (it checks the input), with that code
    failures = {0: Failure(2, 101), 1: Failure(2, 100)}
    assert job_failure(failures, {0: "error: bad", 1: "error: rank 0: bad"}, 2) == (2, "error: bad")
    code, line = job_failure({1: Failure(1)}, {}, 2)  # a bug: its traceback was printed
    assert code == 1 and "rank 1 of 2 failed with exit code 1" in line
    (tmp_path / "rank0").write_text("error: a\nb\n")
    (tmp_path / "rank1").write_text("")
    (tmp_path / "rankx").write_text("garbled")
    assert read_lines(tmp_path) == {0: "error: a b"}


def test_injected_kill_reads_rank_and_call(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1:7")
    assert injected_kill(1) == 7 and injected_kill(0) is None
    for bad in ("", "x:1", "1", "1:"):
        monkeypatch.setenv(FAULT_ENV, bad)
        assert injected_kill(1) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL, gloo")
def test_a_killed_rank_ends_the_job_in_one_line_and_the_run_resumes(tmp_path):
    cache = make_cache(tmp_path / "c", n_tokens=1024)
    run = tmp_path / "run"
    killed = mlsae(
        "train",
        "--nproc",
        "2",
        "--cache",
        str(cache),
        "--out",
        str(run),
        *ARGS,
        env={**ENV, FAULT_ENV: "1:5"},
    )  # rank 1 dies after step 5
    lines = mlsae_lines(killed.stderr)
    assert killed.returncode == 2, killed.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in killed.stderr, killed.stderr[-3000:]
    assert lines[0].startswith("mlsae: error: rank 1 of 2 was killed by signal 9 (SIGKILL")
    assert lines[0].endswith(f"continue with `mlsae train --resume {run} --nproc 2`")
    state = json.loads((run / "checkpoint" / "checkpoint.json").read_text())
    assert 3 <= state["step"] < 12  # the last checkpoint before the kill
    assert not (run / "final_fvu.json").exists()

    resumed = mlsae("train", "--nproc", "2", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert mlsae_lines(resumed.stderr) == []
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert (run / "final_fvu.json").is_file()


def test_bad_input_on_every_rank_is_one_line(tmp_path):
    cache = make_cache(tmp_path / "c", n_tokens=1024)
    bad = mlsae("train", "--nproc", "2", "--cache", str(cache), "--out", str(cache / "run"), *ARGS)
    lines = mlsae_lines(bad.stderr)
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-3000:]
    assert lines[0].startswith("mlsae: error: ") and "rank 0:" not in lines[0]
    assert "Traceback" not in bad.stderr and not (cache / "run").exists()


EXIT_THREADS = """
import os, sys, torch
from mlsae.core.dist import session
from mlsae.core.config import TrainConfig
from mlsae.train.member import make_adam

with session() as comm:
    make_adam([torch.nn.Parameter(torch.ones(4))], TrainConfig(lr=1e-3))  # imports torch._dynamo
    comm.sum_(torch.ones(2))
tasks = os.listdir("/proc/self/task")
print(sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_leaving_the_session_stops_gloos_threads():
    """Class 13: a gloo thread still running at exit aborts the process ("terminate called
    without an active exception", SIGABRT) now and then; after the session none is left."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EXIT_THREADS],
            text=True,
            env={
                **ENV,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "gloo" not in out, out  # gloo_tcp_loop, pt_gloo_runloop


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
