"""`get_strategy(name)`: the tf.distribute strategy for `--strategy`, and who this process is in it."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import tensorflow as tf

from trainer import ingest

# Signs that this machine has a TPU attached or a TPU to connect to; without one of them `auto`
# does not try TPUClusterResolver (on some hosts it probes the GCE metadata server).
TPU_HINTS = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS")


@dataclasses.dataclass(frozen=True)
class Placement:
    """The strategy and this process's place in it."""
    strategy: tf.distribute.Strategy
    name: str  # the resolved kind: one_device, mirrored, multi_worker or tpu
    is_chief: bool = True  # writes config, plots, metrics and the export
    shard: ingest.InputShard = ingest.InputShard()

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def _tpu_strategy() -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)  # wipes the TPU's memory: do it before any work
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as e:  # OSError: the metadata server's URLError
        raise ValueError(f"--strategy tpu: no TPU resolves ({type(e).__name__}: {e}); "
                         f"use --strategy auto or mirrored") from None
    return tf.distribute.TPUStrategy(resolver)


def _mirrored_strategy() -> tf.distribute.Strategy:
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    # No GPU: every logical CPU device (one, unless the process split the CPU into several).
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])


def _worker_index(resolver) -> tuple[int, int]:
    """(this worker's index, number of workers), chief first, as MultiWorkerMirroredStrategy numbers them."""
    spec = resolver.cluster_spec().as_dict()
    chiefs = len(spec.get("chief", []))
    workers = len(spec.get("worker", []))
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    index = task_id if task_type == "chief" else chiefs + task_id
    return index, chiefs + workers


def _multi_worker_placement() -> Placement:
    if "TF_CONFIG" not in os.environ:
        raise ValueError("--strategy multi_worker needs TF_CONFIG (cluster and task); "
                         "Vertex AI sets it, or see tests/test_trainer_distributed.py for a local one")
    try:
        tf_config = json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not JSON: {e}: {os.environ['TF_CONFIG'][:200]!r}") from None
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = strategy.cluster_resolver
    index, count = _worker_index(resolver)
    task_type = resolver.task_type
    # The chief is task "chief", or worker 0 when the cluster has no chief task.
    is_chief = task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in tf_config.get("cluster", {}))
    logging.info("multi_worker: task %s/%s, worker %d of %d, chief=%s", task_type, resolver.task_id, index, count, is_chief)
    return Placement(strategy, "multi_worker", is_chief, ingest.InputShard(count, index))


def get_strategy(name: str) -> Placement:
    """The strategy for `--strategy name`. Build models and optimisers inside `placement.strategy.scope()`."""
    if name == "auto":
        if any(os.environ.get(k) for k in TPU_HINTS) or os.path.exists("/dev/accel0"):  # accel0: a TPU VM's chip
            try:
                return Placement(_tpu_strategy(), "tpu")
            except ValueError as e:  # a TPU hint but no TPU: auto means "the best there is"
                logging.warning("auto: %s; falling back to GPUs/CPU", e)
        if len(tf.config.list_physical_devices("GPU")) > 1:
            return Placement(_mirrored_strategy(), "mirrored")
        return get_strategy("one_device")
    if name == "one_device":
        # The default strategy, not OneDeviceStrategy: tf_keras's BackupAndRestore refuses the latter,
        # and the default places everything on the first GPU, or on the CPU, just the same.
        return Placement(tf.distribute.get_strategy(), "one_device")
    if name == "mirrored":
        return Placement(_mirrored_strategy(), "mirrored")
    if name == "multi_worker":
        return _multi_worker_placement()
    if name == "tpu":
        return Placement(_tpu_strategy(), "tpu")
    raise ValueError(f"unknown strategy {name!r}; choose auto, one_device, mirrored, multi_worker or tpu")
