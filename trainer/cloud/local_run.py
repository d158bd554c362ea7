"""Runs a Vertex AI CustomJobSpec on this machine: one process per replica of every worker pool,
started the way Vertex AI starts its containers.

Vertex AI runs each replica's command and args, with (its "Distributed training" page, and
CustomJobSpec.baseOutputDirectory in the API reference):
  CLUSTER_SPEC  {"cluster": {"workerpool0": ["host:port"], "workerpool1": [...], ...}, "environment": "cloud",
                 "task": {"type": "workerpool1", "index": 0, "trial": "7"}}
  TF_CONFIG     {"cluster": {"chief": [...], "worker": [...], "ps": [...]}, "environment": "cloud",
                 "task": {"type": "worker", "index": 0, "trial": "7"}, "job": <the CustomJobSpec>}
                pools 0, 1, 2, 3 are the tasks chief, worker, ps, evaluator; the evaluator is not in the
                cluster. "trial" only in a tuning trial.
  AIP_MODEL_DIR, AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR
                <baseOutputDirectory>/model/, checkpoints/, logs/; in a trial <baseOutputDirectory>/<trial>/...
  CLOUD_ML_JOB_ID the job's id; in a trial also CLOUD_ML_TRIAL_ID and CLOUD_ML_HP_METRIC_FILE
Here each host is localhost with a free port, a command's leading `python` is this interpreter (the
project's venv), and each replica writes its output to <log_dir>/<task>-<index>.log. When a replica
fails, the others are stopped and the run fails, naming the replica and its log.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO

from google.cloud import aiplatform_v1 as aip

from shared.paths import is_remote
from trainer.cloud import vertex_specs

TASK_TYPES = ("chief", "worker", "ps", "evaluator")  # TF_CONFIG's name of worker pool 0, 1, 2, 3
# Set by Vertex AI in every replica; a parent shell's values must not leak into the local replicas.
VERTEX_ENV = ("CLUSTER_SPEC", "TF_CONFIG", "CLOUD_ML_JOB_ID", "CLOUD_ML_TRIAL_ID", "CLOUD_ML_HP_METRIC_FILE")
STOP_GRACE_SECONDS = 10  # after SIGTERM, before SIGKILL
LOG_TAIL_LINES = 25


class LocalRunError(RuntimeError):
    """The local run could not start or a replica failed; the message names the replica and its log."""


@dataclasses.dataclass(frozen=True)
class Replica:
    task_type: str  # chief, worker, ps or evaluator
    index: int  # within its pool
    command: tuple[str, ...]
    env: dict[str, str]  # the variables Vertex AI sets (the process gets these over this one's environment)
    log_path: str

    @property
    def name(self) -> str:
        return f"{self.task_type}-{self.index}"


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held together, so they are distinct)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def output_dirs(base_output_dir: str, trial: str | None = None) -> dict[str, str]:
    """AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR as Vertex AI derives them."""
    base = base_output_dir.rstrip("/") + (f"/{trial}" if trial else "")
    return {"AIP_MODEL_DIR": f"{base}/model/", "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
            "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/"}


def pool_command(pool: aip.WorkerPoolSpec, python: str) -> list[str]:
    """What the pool's container would run, with `python` meaning this interpreter."""
    if pool.container_spec.image_uri:
        if not pool.container_spec.command:
            raise LocalRunError(f"the pool's container spec has no command (the image's ENTRYPOINT cannot run "
                                f"here): {vertex_specs.spec_to_dict(pool.container_spec)}")
        command = list(pool.container_spec.command) + list(pool.container_spec.args)
    else:
        package = pool.python_package_spec
        command = ["python", "-m", package.python_module, *package.args]
    return [python if i == 0 and part in ("python", "python3") else part for i, part in enumerate(command)]


def plan_replicas(spec: aip.CustomJobSpec, job_id: str, log_dir: str, trial: str | None = None,
                  trial_args: Sequence[str] = (), metric_file: str | None = None,
                  python: str = sys.executable) -> list[Replica]:
    """One Replica per replica of every non-empty pool, with Vertex AI's environment for it."""
    pools = [(i, pool) for i, pool in enumerate(spec.worker_pool_specs) if pool.replica_count > 0]
    if not pools or pools[0][0] != 0 or pools[0][1].replica_count != 1:
        raise LocalRunError("worker pool 0 must hold the one primary replica (replicaCount 1)")
    if len(spec.worker_pool_specs) > len(TASK_TYPES):
        raise LocalRunError(f"Vertex AI takes at most {len(TASK_TYPES)} worker pools, got {len(spec.worker_pool_specs)}")
    ports = iter(free_ports(sum(pool.replica_count for _, pool in pools)))
    addresses = {i: [f"localhost:{next(ports)}" for _ in range(pool.replica_count)] for i, pool in pools}
    cluster_spec = {f"workerpool{i}": hosts for i, hosts in addresses.items()}
    tf_cluster = {TASK_TYPES[i]: hosts for i, hosts in addresses.items() if TASK_TYPES[i] != "evaluator"}
    job = vertex_specs.spec_to_dict(spec)
    common = {"CLOUD_ML_JOB_ID": job_id, **output_dirs(spec.base_output_directory.output_uri_prefix, trial)}
    if trial is not None:
        common["CLOUD_ML_TRIAL_ID"] = trial
        if metric_file:
            common["CLOUD_ML_HP_METRIC_FILE"] = metric_file
    replicas = []
    for i, pool in pools:
        command = pool_command(pool, python) + list(trial_args)
        for index in range(pool.replica_count):
            task = {"type": f"workerpool{i}", "index": index, **({"trial": trial} if trial is not None else {})}
            tf_task = dict(task, type=TASK_TYPES[i])
            env = dict(common, **{e.name: e.value for e in pool.container_spec.env})
            env["CLUSTER_SPEC"] = json.dumps({"cluster": cluster_spec, "environment": "cloud", "task": task})
            env["TF_CONFIG"] = json.dumps({"cluster": tf_cluster, "environment": "cloud", "task": tf_task, "job": job})
            replicas.append(Replica(TASK_TYPES[i], index, tuple(command), env,
                                    os.path.join(log_dir, f"{TASK_TYPES[i]}-{index}.log")))
    return replicas


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to each running replica's process group, then SIGKILL to those still alive after the grace."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in running:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_replicas(replicas: Sequence[Replica], out: TextIO = sys.stdout, timeout: float | None = None,
                 stop: threading.Event | None = None, label: str = "", poll_seconds: float = 0.2) -> None:
    """Starts every replica and waits for all; LocalRunError when one fails (the others are stopped),
    when `timeout` seconds pass, or when `stop` is set."""
    os.makedirs(os.path.dirname(replicas[0].log_path), exist_ok=True)
    base_env = {k: v for k, v in os.environ.items() if k not in VERTEX_ENV and not k.startswith("AIP_")}
    procs: list[subprocess.Popen] = []
    try:
        for r in replicas:
            with open(r.log_path, "w") as log:  # the child keeps its own descriptor
                # Its own session: stopping it stops whatever it started too.
                procs.append(subprocess.Popen(r.command, env={**base_env, **r.env}, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            out.write(f"{label}started {r.name} (pid {procs[-1].pid}), log {r.log_path}\n")
        out.flush()
        started = time.monotonic()
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, code) for r, code in zip(replicas, codes) if code not in (None, 0)]
            if failed:
                replica, code = failed[0]
                _stop(procs)
                raise LocalRunError(f"{label}replica {replica.name} failed (exit {code}); the others were stopped. "
                                    f"Its log, {replica.log_path}, ends:\n{log_tail(replica.log_path)}")
            if all(code == 0 for code in codes):
                out.write(f"{label}all {len(replicas)} replica(s) exited 0\n")
                return
            if timeout is not None and time.monotonic() - started > timeout:
                _stop(procs)
                raise LocalRunError(f"{label}stopped after {timeout:g} s (--local_run_timeout); logs in "
                                    f"{os.path.dirname(replicas[0].log_path)}")
            if stop is not None and stop.is_set():
                _stop(procs)
                raise LocalRunError(f"{label}stopped")
            time.sleep(poll_seconds)
    except BaseException:  # KeyboardInterrupt included: no replica outlives the run
        _stop(procs)
        raise


def replica_log_dir(job_dir: str, trial: str | None = None) -> str:
    """Where the replicas' logs go: <job_dir>[/<trial>]/replicas (a local job dir; a remote one keeps
    them in the current folder's local_run/ instead, since the logs are written as plain files)."""
    root = os.path.join("local_run", os.path.basename(job_dir.rstrip("/"))) if is_remote(job_dir) else job_dir
    return os.path.join(root, *([trial] if trial else []), "replicas")


def run_custom_job(spec: aip.CustomJobSpec, job_id: str, job_dir: str, out: TextIO = sys.stdout,
                   timeout: float | None = None) -> list[Replica]:
    """Runs the job's replicas here until all finish; LocalRunError names the one that failed."""
    replicas = plan_replicas(spec, job_id, replica_log_dir(job_dir))
    out.write(f"# local run of {job_id}: {len(replicas)} replica(s) "
              f"({', '.join(r.name for r in replicas)}) with Vertex AI's environment\n")
    for r in replicas:
        out.write(f"#   {r.name}: {' '.join(r.command)}\n")
    run_replicas(replicas, out, timeout)
    return replicas
