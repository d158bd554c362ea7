"""Strategies in real processes: mirrored over two logical CPUs; multi-worker with two local workers."""
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from tests import trainer_fixtures as fx
from trainer import run_folder, train
from trainer.cloud.local_run import free_ports

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300  # seconds per training process; each takes ~20-40 s on 2 cores


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fx.make_image_files(str(tmp_path_factory.mktemp("images")), per_class=12)


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory, images):
    out = str(tmp_path_factory.mktemp("jpeg"))
    fx.write_dataset(out, images, "jpeg", shards_per_split={"train": 2, "valid": 1, "test": 1})
    return out


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def test_mirrored_over_two_logical_cpus(tmp_path, jpeg_dir, images):
    job = str(tmp_path / "run")
    argv = fx.trainer_argv(jpeg_dir, job, strategy="mirrored", model="dnn", crop_ratio=0.5, num_epochs=2, lrate=0.001)
    script = ("import sys, tensorflow as tf\n"
              "cpu = tf.config.list_physical_devices('CPU')[0]\n"
              "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
              "from trainer import train\n"
              f"sys.exit(train.main({argv!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = json.load(open(os.path.join(job, run_folder.CONFIG_FILE)))["resolved"]
    assert (resolved["strategy"], resolved["num_replicas"], resolved["per_replica_batch_size"]) == ("mirrored", 2, 4)
    assert "global batch size 8 = 2 replicas x 4 per replica" in done.stderr
    out = tf.saved_model.load(os.path.join(job, run_folder.EXPORT_DIR)).signatures["predict_filenames"](
        filenames=tf.constant([images[0][0]]))
    assert out["probabilities"].shape == (1, 3)


def test_multi_worker_two_local_workers_only_the_chief_exports(tmp_path, jpeg_dir):
    job = str(tmp_path / "run")
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    argv = fx.trainer_argv(jpeg_dir, job, strategy="multi_worker", model="dnn", crop_ratio=0.5, num_epochs=2,
                           lrate=0.001)
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        log = open(tmp_path / f"worker{index}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "trainer.train", *argv], cwd=ROOT,
                                       env=_env(TF_CONFIG=tf_config), stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = [open(tmp_path / f"worker{i}.log").read() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)
    for i, text in enumerate(logs):
        assert "Epoch 2/2" in text, f"worker {i} did not train both epochs"
        assert f"worker {i} of 2, chief={i == 0}" in text
        assert "global batch size 8 = 2 replicas x 4 per replica, 2 worker(s)" in text
        assert "sharding by file (2 files over 2 workers)" in text
    assert "metrics of the exported weights" in logs[0] and "metrics of the exported weights" not in logs[1]
    assert os.path.exists(os.path.join(job, run_folder.EXPORT_DIR, "saved_model.pb"))
    metrics = json.load(open(os.path.join(job, run_folder.METRICS_FILE)))
    assert metrics["epochs_run"] == 2 and "test_accuracy" in metrics
    leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(job) for n in dirs + files if "workertemp" in n]
    assert not leftovers, f"non-chief temporary files were not cleaned up: {leftovers}"
