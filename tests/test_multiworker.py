"""MultiWorkerMirroredStrategy through TF_CONFIG: two `resic train` workers on 127.0.0.1 train
real rows; only the chief writes the run; a lost worker's run resumes through BackupAndRestore."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from conftest import write_rows
from test_faults import _env, assert_each_epoch_once, committed_epoch, start, train_args, wait_for

EPOCHS = 2
RUN_FILES = {"config.json", "train_config.json", "vocab.json", "validation.parquet",
             "model.keras", "model.keras.best.json", "metrics.csv", "run.json",
             "final_exits.md", "tensorboard"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_workers(args: list[str], ports: list[int]) -> list[subprocess.Popen]:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [start(args, env=dict(_env(), TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}}))) for i in range(len(ports))]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"worker {i}:\n{err[-3000:]}"
        outs.append(out)
    return outs


def lc_macro_f1(run) -> dict[str, float]:
    scores = json.loads((run / "run.json").read_text())["final_val_scores"]
    return {task: scores[f"{task}_lc"]["macro_f1"] for task in ("bias", "hate")}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("mw") / "rows.tsv", 160)


@pytest.mark.large
def test_two_workers_train_like_one_and_only_the_chief_writes(rows, tmp_path):
    env = {k: v for k, v in _env().items() if k != "TF_CONFIG"}
    single = tmp_path / "single"
    run = tmp_path / "two"
    # The one-worker run trains alongside the cluster: the workers often wait on each other.
    procs = [start(train_args(rows, single, EPOCHS), env=env),
             *start_workers(train_args(rows, run, EPOCHS), free_ports(2))]
    try:
        finish(procs[:1])
        outs = finish(procs[1:])
    finally:
        for proc in procs:  # none left running when a check failed
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert "Worker 1 finished its 2 epochs" in outs[1]
    state = json.loads((run / "run.json").read_text())
    assert state["replicas"] == 2 and state["epochs_run"] == EPOCHS
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no worker backup left, nothing else
    assert_each_epoch_once(run, EPOCHS)
    one, two = lc_macro_f1(single), lc_macro_f1(run)
    print(f"\nLC macro-F1, one worker {one}, two workers {two}")
    # Same rows, seed and global batch; each worker's BatchNorm sees half a batch.
    assert all(abs(one[t] - two[t]) <= 0.25 for t in one), (one, two)


@pytest.mark.large
def test_a_lost_worker_resumes_from_the_last_epoch(rows, tmp_path):
    run = tmp_path / "run"
    args = train_args(rows, run, EPOCHS)
    ports = free_ports(2)
    chief, worker = start_workers(args, ports)
    wait_for(lambda: committed_epoch(run / "backup") >= 1 and
             committed_epoch(run / "backup-worker-1") >= 1, worker, what="epoch 1 on both")
    os.kill(worker.pid, signal.SIGKILL)  # in epoch 2
    worker.communicate()
    try:  # the chief fails or hangs in its next collective
        _, err = chief.communicate(timeout=15)
        print(f"\nthe chief, its worker lost: exit code {chief.returncode}, "
              f"{err.strip().splitlines()[-1][:300]}")
        # one line saying what happened and how to resume, no traceback
        assert chief.returncode == 1 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(
            "resic train: error: a worker of the cluster failed or was lost ("), err[-3000:]
    except subprocess.TimeoutExpired:
        chief.kill()
        chief.communicate()
        print("\nthe chief, its worker lost: hung 15 s, killed")
    assert json.loads((run / "run.json").read_text())["status"] == "training"
    assert committed_epoch(run / "backup") == committed_epoch(run / "backup-worker-1") == 1

    outs = finish(start_workers(args, ports))
    assert f"Resuming the unfinished run in {run} at epoch 2/{EPOCHS}" in outs[0]
    assert "at epoch 2/" in outs[1] and "Worker 1 finished its 1 epochs" in outs[1]
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "finished" and state["epochs_this_process"] == 1
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert_each_epoch_once(run, EPOCHS)
