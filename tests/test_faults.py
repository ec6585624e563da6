"""Faults: a killed or interrupted `resic train` resumes and records every epoch exactly once; a
killed export leaves no partial version; a read-only or full disk fails in one line with the
earlier files intact. Real processes, real signals, real rows."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import tiny_train_args, write_rows

EPOCHS = 4


def _env() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def train_args(data: Path, out: Path, epochs: int = EPOCHS) -> list[str]:
    """A tiny real run: 2 stages of 1 block, 4 filters, no n-gram branch (quick to save)."""
    return ["train", "--data", str(data), "--val-split", "0.2", "--text-col", "comments",
            "--label-cols", "bias,hate", "--filters", "4,4", "--blocks", "1,1",
            "--ngram-buckets", "0", "--epochs", str(epochs), "--batch-size", "8", "--seed", "1",
            "--out", str(out), "--quiet"]


def _default_sigint() -> None:
    # A suite started in the background (`cmd &`, nohup, some CI runners) inherits an ignored
    # SIGINT, and Python keeps it ignored: give the child the terminal's default, as a user's
    # `resic train` has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "resic_tf.cli", *args], env=kwargs.pop(
        "env", _env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint, **kwargs)


def committed_epoch(backup: Path) -> int:
    from resic_tf.callbacks import read_backup_metadata
    meta = read_backup_metadata(backup)
    return meta["epoch"] if meta else 0


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def epoch_steps(run: Path) -> dict[str, list[int]]:
    """`sub/tag` -> the steps of every scalar event under the run's training TensorBoard dirs."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2
    events = defaultdict(list)
    for sub in ("train", "validation", "exits"):
        for path in (run / "tensorboard" / sub).glob("events.out.tfevents.*"):
            for record in tf.data.TFRecordDataset(str(path)):
                event = event_pb2.Event.FromString(record.numpy())
                for value in event.summary.value:
                    events[f"{sub}/{value.tag}"].append((event.wall_time, event.step))
    # In the order written: file names hold a per-process counter that does not sort as text
    # (".10" before ".9"), so two files of the same second could come out swapped.
    return defaultdict(list, {tag: [step for _, step in sorted(v)] for tag, v in events.items()})


def assert_each_epoch_once(run: Path, epochs: int) -> None:
    from resic_tf.callbacks import read_metrics_csv
    rows = read_metrics_csv(run / "metrics.csv")
    keys = [(r["epoch"], r["output"]) for r in rows]
    assert len(keys) == len(set(keys)) == epochs * 4  # (IC + LC) x 2 tasks per epoch
    assert sorted({e for e, _ in keys}) == list(range(1, epochs + 1))
    steps = epoch_steps(run)
    epoch_tags = [t for t in steps if t.split("/", 1)[1].startswith(("epoch_", "macro_f1/",
                                                                      "accuracy/"))]
    assert "exits/macro_f1/bias_lc" in epoch_tags and "train/epoch_loss" in epoch_tags
    assert "validation/epoch_loss" in epoch_tags
    for tag in epoch_tags:
        assert sorted(steps[tag]) == list(range(epochs)), tag


def write_after_commit(run: Path, epoch: int) -> None:
    """What a process killed between writing epoch `epoch` + 1 and committing it leaves: its
    rows in metrics.csv and its TensorBoard scalars (after the commit's time)."""
    import tensorflow as tf
    with open(run / "metrics.csv", "a", encoding="utf-8") as f:
        f.write(f"{epoch + 1},bias_lc,0.5,0.5\n")
    for sub, tag in (("exits", "macro_f1/bias_lc"), ("train", "epoch_loss")):
        writer = tf.summary.create_file_writer(str(run / "tensorboard" / sub))
        with writer.as_default():
            tf.summary.scalar(tag, 0.5, step=epoch)
        writer.close()


@pytest.mark.large
def test_killed_training_resumes_from_its_last_epoch_and_logs_each_epoch_once(tmp_path):
    data = write_rows(tmp_path / "rows.tsv", 200)
    run = tmp_path / "run"
    args = train_args(data, run)
    proc = start(args)
    wait_for(lambda: committed_epoch(run / "backup") >= 1, proc, what="the first epoch")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    done = committed_epoch(run / "backup")
    assert 1 <= done < EPOCHS and json.loads((run / "run.json").read_text())["status"] == \
        "training"
    write_after_commit(run, done)  # the window between an epoch's files and its commit

    proc = start(args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"Resuming the unfinished run in {run} at epoch {done + 1}/{EPOCHS}" in out
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "finished" and state["epochs_run"] == EPOCHS
    assert state["epochs_this_process"] == EPOCHS - done
    assert not (run / "backup").exists()
    assert_each_epoch_once(run, EPOCHS)


@pytest.mark.large
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    data = write_rows(tmp_path / "rows.tsv", 200)
    run = tmp_path / "run"
    # Before the first epoch finished: nothing to resume, and it says so.
    proc = start(train_args(data, run, epochs=2))
    wait_for(lambda: (run / "run.json").exists(), proc, what="the run directory")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert committed_epoch(run / "backup") == 0
    lines = [l for l in err.splitlines() if l.startswith("resic train:")]
    assert len(lines) == 1 and "no epoch had finished" in lines[0], err[-2000:]

    # After one: resumable from epoch 2, with the command (--overwrite dropped).
    proc = start(train_args(data, run) + ["--overwrite"])
    wait_for(lambda: committed_epoch(run / "backup") >= 1, proc, what="the first epoch")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    done = committed_epoch(run / "backup")
    line = [l for l in err.splitlines() if l.startswith("resic train:")]
    assert line == [f"resic train: interrupted; the run is resumable from epoch {done + 1}/"
                    f"{EPOCHS} ({done} finished and saved); resume it with the same command: "
                    f"resic {' '.join(train_args(data, run))}"], err[-2000:]

    proc = start(train_args(data, run))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"at epoch {done + 1}/{EPOCHS}" in out
    assert json.loads((run / "run.json").read_text())["epochs_this_process"] == EPOCHS - done
    assert_each_epoch_once(run, EPOCHS)


def test_pruning_keeps_what_was_committed(tmp_path):
    """Events and rows up to the commit stay; later ones go; a file left empty is removed."""
    import tensorflow as tf

    from resic_tf.resume import prune_after_commit
    run = tmp_path / "run"
    for step in range(3):
        writer = tf.summary.create_file_writer(str(run / "tensorboard" / "exits"))
        with writer.as_default():
            tf.summary.scalar("macro_f1/t_lc", 0.1 * step, step=step)
        writer.close()
        if step == 1:
            committed_at = time.time()
            time.sleep(0.01)
    (run / "metrics.csv").write_text("epoch,output,accuracy,macro_f1\n" + "".join(
        f"{e},t_lc,0.5,0.5\n" for e in (1, 2, 3)), encoding="utf-8")
    dropped = prune_after_commit(run / "tensorboard", run / "metrics.csv",
                                 {"epoch": 2, "committed_at": committed_at})
    assert dropped == 2
    assert epoch_steps(run) == {"exits/macro_f1/t_lc": [0, 1]}
    assert len(list((run / "tensorboard" / "exits").iterdir())) == 2
    assert (run / "metrics.csv").read_text().count("t_lc") == 2
    assert prune_after_commit(run / "tensorboard", run / "metrics.csv", None) == 4
    assert epoch_steps(run) == {} and list((run / "tensorboard" / "exits").iterdir()) == []


# === Export ======================================================================================

@pytest.fixture(scope="module")
def calibrated(tiny_run, tmp_path_factory):
    """A calibrated copy of the session's tiny run, exported once as version 1."""
    from resic_tf.cli import main
    run = tmp_path_factory.mktemp("faults") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["calibrate", str(run), "--min-support", "5"]) == 0
    base = run.parent / "savedmodels" / "tiny"
    assert main(["export", str(run), "--out", str(base)]) == 0
    return run, base


def _signature_outputs(version: Path) -> dict:
    import tensorflow as tf
    served = tf.saved_model.load(str(version)).signatures["serving_default"]
    outputs = served(text=tf.constant(["정말 재밌어요", "another text"]))
    return {k: v.numpy().tolist() for k, v in outputs.items() if v.dtype != tf.string}


@pytest.mark.large
def test_killed_export_leaves_no_version_and_the_next_one_cleans_up(calibrated):
    from resic_tf.cli import main
    run, base = calibrated
    before = _signature_outputs(base / "1")
    proc = start(["export", str(run), "--out", str(base)])
    wait_for(lambda: any(p.name.startswith(".2.tmp.") for p in base.iterdir()), proc,
             what="the export's temporary directory")
    time.sleep(0.3)  # inside the SavedModel write
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    stale = [p for p in base.iterdir() if p.name.startswith(".")]
    assert [p.name for p in base.iterdir() if not p.name.startswith(".")] == ["1"]
    assert len(stale) == 1 and f".tmp.{proc.pid}@" in stale[0].name
    assert _signature_outputs(base / "1") == before  # intact and loadable
    assert main(["export", str(run), "--out", str(base)]) == 0
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]  # the dead one's temp is gone
    assert _signature_outputs(base / "2") == before


def test_export_keeps_the_temporaries_of_live_exports(tmp_path):
    from resic_tf.io import _host, atomic_directory
    live = tmp_path / f".3.tmp.{os.getpid()}@{_host()}.abcdefgh"
    other_host = tmp_path / ".3.tmp.1@elsewhere.abcdefgh"
    live.mkdir()
    other_host.mkdir()
    with atomic_directory(tmp_path / "4") as tmp:
        (tmp / "x").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["4", live.name,
                                                                 other_host.name])


# === A read-only or full disk ====================================================================

def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def read_only(monkeypatch):
    """Make a directory read-only: chmod 555, or (root ignores permissions) every temporary
    file or directory created in it fails as a read-only directory's would."""
    made = []

    def make(directory: Path) -> None:
        if os.geteuid() != 0:
            for d in [directory, *[p for p in directory.rglob("*") if p.is_dir()]]:
                d.chmod(0o555)
                made.append(d)
            return
        real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

        def refuse(real):
            def create(*args, dir=None, **kwargs):
                if dir is not None and Path(dir).resolve().is_relative_to(directory.resolve()):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                                          str(Path(dir) / "tmpXXXX"))
                return real(*args, dir=dir, **kwargs)
            return create
        monkeypatch.setattr(tempfile, "mkstemp", refuse(real_mkstemp))
        monkeypatch.setattr(tempfile, "mkdtemp", refuse(real_mkdtemp))

    yield make
    for d in made:
        d.chmod(0o755)


@pytest.fixture
def full_disk(monkeypatch):
    """Every file written through resic_tf.io gets half its bytes, then ENOSPC, as on a full
    disk."""
    import resic_tf.io as io_module

    def write(path, data):
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_module, "_write", write)


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("resic ")]  # not progress lines
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"resic {command}: error: cannot write "), lines[0]
    return lines[0]


def test_calibrate_on_a_full_disk_keeps_the_earlier_gate(calibrated, tmp_path, full_disk,
                                                         capsys):
    from resic_tf.cli import main
    run = tmp_path / "run"
    shutil.copytree(calibrated[0], run)
    before = _files(run)
    assert main(["calibrate", str(run), "--bucket-width", "20"]) == 2
    line = _one_error_line(capsys, "calibrate")
    assert line.startswith(f"resic calibrate: error: cannot write {run / 'gate.json'}: "
                           f"{os.strerror(errno.ENOSPC)}; nothing was changed")
    assert _files(run) == before  # the earlier gate.json, and no temporary file


def test_calibrate_in_a_read_only_run_keeps_the_earlier_gate(calibrated, tmp_path, read_only,
                                                             capsys):
    from resic_tf.cli import main
    run = tmp_path / "run"
    shutil.copytree(calibrated[0], run)
    before = _files(run)
    read_only(run)
    assert main(["calibrate", str(run), "--bucket-width", "20"]) == 2
    line = _one_error_line(capsys, "calibrate")
    assert f"cannot write {run / 'gate.json'}: {os.strerror(errno.EACCES)}; nothing was " \
        "changed" in line
    assert _files(run) == before


def test_export_to_a_read_only_base_keeps_the_earlier_versions(calibrated, tmp_path, read_only,
                                                               capsys):
    from resic_tf.cli import main
    run, base = calibrated
    copy = tmp_path / "sm"
    shutil.copytree(base, copy)
    before = _files(copy)
    from resic_tf.export import next_version
    target = copy / str(next_version(copy))  # 2, or 3 after the killed-export test's
    read_only(copy)
    assert main(["export", str(run), "--out", str(copy)]) == 2
    line = _one_error_line(capsys, "export")
    assert f"cannot write {target}: {os.strerror(errno.EACCES)}; nothing was changed" in line
    assert _files(copy) == before


def test_export_when_tensorflow_finds_the_disk_full(calibrated, tmp_path, monkeypatch, capsys):
    """TensorFlow's own file system raises `OpError`s, not OSErrors: a full disk met while the
    SavedModel is written is still one line, and no version appears."""
    import keras
    import tensorflow as tf

    from resic_tf.cli import main
    from resic_tf.export import next_version
    run, base = calibrated
    copy = tmp_path / "sm"
    shutil.copytree(base, copy)
    before = _files(copy)
    target = copy / str(next_version(copy))

    def write_out(self, path, **kwargs):
        (Path(path) / "variables").mkdir(parents=True)
        (Path(path) / "variables" / "variables.data-00000-of-00001").write_bytes(b"half")
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{path}/variables/variables.data-00000-of-00001; "
            f"{os.strerror(errno.ENOSPC)}")

    def save(self, *args, **kwargs):  # the frozen export's writer (the default)
        path = Path(self._export_dir)
        (path / "saved_model.pb").write_bytes(b"half")
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{path}/saved_model.pb; {os.strerror(errno.ENOSPC)}")

    # ExportArchive() makes an instance of a backend class: patch that one
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", write_out)
    monkeypatch.setattr(tf.compat.v1.saved_model.Builder, "save", save)
    for flags in ([], ["--no-freeze"]):
        assert main(["export", str(run), "--out", str(copy), *flags]) == 2
        line = _one_error_line(capsys, "export")
        assert line == (f"resic export: error: cannot write {target}: "
                        f"{os.strerror(errno.ENOSPC)}; nothing was changed (each file is "
                        "replaced only once written whole)")
        assert _files(copy) == before and not any(p.name.startswith(".")
                                                  for p in copy.iterdir())


def test_resumed_training_in_a_read_only_run_keeps_its_files(tiny_run, real_tsv, tmp_path,
                                                             read_only, capsys):
    """An unfinished run (the tiny run, marked unfinished) resumed in a read-only directory."""
    from resic_tf.cli import main
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    state = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**state, "status": "training"}))
    before = _files(run)
    read_only(run)
    assert main(tiny_train_args(real_tsv, run)) == 2  # the tiny run's own command
    line = _one_error_line(capsys, "train")
    assert f"cannot write {run / 'run.json'}: {os.strerror(errno.EACCES)}; the files " \
        "already written are intact" in line
    assert _files(run) == before  # metrics.csv, model.keras, ... unchanged


def test_restore_point_takes_the_last_whole_commit(tmp_path):
    """A commit whose weights file is missing, or a torn metadata file, falls back to the
    previous commit; no commit means epoch 0."""
    from resic_tf.callbacks import restore_point

    def commit(name: str, epoch: int) -> None:
        (tmp_path / name).write_text(json.dumps({"epoch": epoch, "committed_at": float(epoch),
                                                 "weights": f"epoch-{epoch}.weights.h5"}))
    commit("training_metadata.json.bkp", 1)
    commit("training_metadata.json", 2)
    (tmp_path / "epoch-1.weights.h5").write_bytes(b"h5")
    assert restore_point(tmp_path)["epoch"] == 1
    (tmp_path / "epoch-2.weights.h5").write_bytes(b"h5")
    assert restore_point(tmp_path)["epoch"] == 2
    (tmp_path / "training_metadata.json").write_text('{"epoch": 2, "wei')
    assert restore_point(tmp_path)["epoch"] == 1
    assert restore_point(tmp_path / "missing") is None
