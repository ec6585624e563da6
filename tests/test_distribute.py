"""The tf.distribute path: MirroredStrategy over two logical CPU devices trains a real run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from resic_tf.config import TrainConfig
from resic_tf.training import train
tc = TrainConfig(data=sys.argv[1], text_col="comments", label_cols=("bias", "hate"),
                 val_split=0.2, epochs=1, batch_size=32, seed=3, strategy="mirrored")
summary = train(tc, sys.argv[2], {"filters": [4, 4], "blocks": [1, 1]}, verbose=0)
print("RESULT" + json.dumps({"replicas": summary["replicas"],
                             "status": summary["status"], "epochs": summary["epochs_run"]}))
'''


@pytest.mark.large
def test_mirrored_strategy_over_two_cpu_devices(real_tsv, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(real_tsv), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
    assert result == {"replicas": 2, "status": "finished", "epochs": 1}
    rows = (tmp_path / "run" / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + 2 * 2  # header + (1 IC + LC) x 2 tasks for the one epoch
    assert (tmp_path / "run" / "model.keras").is_file()
