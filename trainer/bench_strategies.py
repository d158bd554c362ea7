"""`python -m trainer.bench_strategies --data DIR [trainer flags]`: one epoch under each distribution strategy.

The chapter's comparison (an epoch took ~100 s on the CPU, 55 s on one GPU, 29 s on two) on your
data and model: the trainer's own input pipeline and model (trainer.ingest, trainer.models, the
given trainer flags), one training epoch timed after --warmup_epochs untimed ones (tracing,
first reads), no validation. Rows, each in fresh processes:
  one_device     the CPU (and one GPU, when there is one)
  mirrored       every GPU; on a machine without one, the CPU split into --logical_cpus devices
  multi_worker   two local worker processes, TF_CONFIG on localhost ports (each with half the GPUs, if any)
The global batch is --per_replica_batch times the replicas, as the chapter advises ("if one GPU
handles 32, two handle 64"), so every row trains on the same examples per epoch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from shared import native_log

RESULT_PREFIX = "BENCH_STRATEGY_RESULT "
STRATEGIES = ("one_device", "mirrored", "multi_worker")
TIMEOUT_SECONDS = 3600  # per row


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """One row: which strategy, on what, in how many processes."""
    strategy: str
    devices: str  # as the table shows it
    logical_cpus: int = 1  # >1: the process splits its CPU into this many devices
    processes: int = 1
    visible_gpus: tuple[str, ...] | None = None  # CUDA_VISIBLE_DEVICES per process; None = unchanged


def plan_rows(num_gpus: int, strategies: tuple[str, ...], logical_cpus: int) -> list[RowPlan]:
    rows = []
    if "one_device" in strategies:
        rows.append(RowPlan("one_device", "CPU", visible_gpus=("-1",) if num_gpus else None))
        if num_gpus:
            rows.append(RowPlan("one_device", "1 GPU", visible_gpus=("0",)))
    if "mirrored" in strategies:
        if num_gpus > 1:
            rows.append(RowPlan("mirrored", f"{num_gpus} GPUs"))
        elif not num_gpus:
            rows.append(RowPlan("mirrored", f"{logical_cpus} logical CPUs", logical_cpus=logical_cpus))
    if "multi_worker" in strategies:
        if num_gpus > 1:
            half = num_gpus // 2
            split = (",".join(map(str, range(half))), ",".join(map(str, range(half, 2 * half))))
            rows.append(RowPlan("multi_worker", f"2 local processes x {half} GPU(s)", processes=2, visible_gpus=split))
        else:
            rows.append(RowPlan("multi_worker", "2 local processes (CPU)", processes=2,
                                visible_gpus=("-1", "-1") if num_gpus else None))
    return rows


# --- one row, in its own process ----------------------------------------------------------------

def run_row(strategy: str, logical_cpus: int, per_replica_batch: int, warmup_epochs: int,
            trainer_argv: list[str]) -> dict:
    """Trains warmup_epochs + 1 epochs as the trainer would under `strategy`; returns the last epoch's numbers."""
    import tensorflow as tf

    if logical_cpus > 1:  # before anything starts TF's runtime
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    import tf_keras as keras

    from trainer import config as config_lib, ingest, models, shard_pattern, strategy as strategy_lib, train

    placement = strategy_lib.get_strategy(strategy)
    global_batch = per_replica_batch * placement.num_replicas
    config = config_lib.parse_config([*trainer_argv, "--batch_size", str(global_batch)])
    meta = shard_pattern.select_shards(ingest.load_dataset_metadata(config.data), config.pattern, config.data)
    spec = train.resolve_model_spec(config, meta)
    num_train = config.num_training_examples or meta.splits["train"].num_examples
    steps = max(1, num_train // global_batch)
    train_ds = ingest.make_train_dataset(meta, config.data, global_batch, input_size=spec.input_size,
                                         seed=config.seed, cache=config.cache, shard=placement.shard)
    keras.utils.set_random_seed(config.seed)
    with placement.strategy.scope():
        model = models.build_model(spec)
        models.compile_model(model, config.lrate)

    class EpochSeconds(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.began)

    timer = EpochSeconds()
    model.fit(train_ds, epochs=warmup_epochs + 1, steps_per_epoch=steps, callbacks=[timer], verbose=0)
    seconds = timer.seconds[-1]
    return {"strategy": placement.name, "replicas": placement.num_replicas, "workers": placement.shard.num_workers,
            "is_chief": placement.is_chief, "global_batch": global_batch, "steps": steps,
            "examples": steps * global_batch, "epoch_seconds": seconds,
            "examples_per_second": steps * global_batch / seconds, "model": spec.kind, "form": meta.form,
            "input_size": spec.input_size}


# --- the parent: plans rows, runs each in fresh processes, prints the table ----------------------

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _row_command(row: RowPlan, args: argparse.Namespace, trainer_flags: list[str], job_dir: str) -> list[str]:
    return [sys.executable, "-m", "trainer.bench_strategies", "--row", row.strategy,
            "--logical_cpus", str(row.logical_cpus), "--per_replica_batch", str(args.per_replica_batch),
            "--warmup_epochs", str(args.warmup_epochs), "--data", args.data, "--job_dir", job_dir, *trainer_flags]


def measure_row(row: RowPlan, args: argparse.Namespace, trainer_flags: list[str]) -> dict:
    """Runs the row's process(es); returns the chief's result. RuntimeError with the log's tail on failure."""
    ports = _free_ports(row.processes) if row.processes > 1 else []
    procs = []
    with tempfile.TemporaryDirectory(prefix="bench_strategies_") as tmp:
        for index in range(row.processes):
            env = dict(os.environ)
            if row.visible_gpus is not None:
                env["CUDA_VISIBLE_DEVICES"] = row.visible_gpus[index]
            if ports:
                env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                               "task": {"type": "worker", "index": index}})
            log = open(os.path.join(tmp, f"process{index}.log"), "w+")
            procs.append((subprocess.Popen(_row_command(row, args, trainer_flags, os.path.join(tmp, "run")),
                                           env=env, stdout=log, stderr=subprocess.STDOUT, text=True), log))
        try:
            codes = [p.wait(timeout=TIMEOUT_SECONDS) for p, _ in procs]
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results, texts = [], []
        for _, log in procs:
            log.seek(0)
            texts.append(log.read())
            log.close()
            results += [json.loads(line[len(RESULT_PREFIX):]) for line in texts[-1].splitlines()
                        if line.startswith(RESULT_PREFIX)]
    chief = [r for r in results if r["is_chief"]]
    if any(codes) or not chief:
        raise RuntimeError(f"{row.strategy} ({row.devices}) failed, exit codes {codes}:\n" +
                           "\n---\n".join(t[-3000:] for t in texts))
    return chief[0]


def format_table(rows: list[tuple[RowPlan, dict]]) -> str:
    lines = ["| strategy | devices | global batch | steps | epoch wall s | examples/s | speed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    base = rows[0][1]["epoch_seconds"]
    for plan, r in rows:
        lines.append(f"| {plan.strategy} | {plan.devices} | {r['global_batch']} | {r['steps']} | "
                     f"{r['epoch_seconds']:.2f} | {r['examples_per_second']:.0f} | {base / r['epoch_seconds']:.2f}x |")
    return "\n".join(lines)


def make_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.bench_strategies", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                epilog="Other flags (--model, --image_size, --num_hidden, ...) go to the trainer's parser.")
    p.add_argument("--data", required=True, help="ETL output folder")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, of {STRATEGIES}")
    p.add_argument("--per_replica_batch", type=int, default=32, help="the global batch is this times the replicas")
    p.add_argument("--warmup_epochs", type=int, default=1, help="untimed epochs before the timed one")
    p.add_argument("--logical_cpus", type=int, default=2, help="CPU devices of the mirrored row without GPUs")
    p.add_argument("--row", choices=STRATEGIES, help=argparse.SUPPRESS)  # a row's own process
    p.add_argument("--job_dir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args, trainer_flags = make_arg_parser().parse_known_args(argv)
    trainer_argv = ["--data", args.data, "--job_dir", args.job_dir or "unused", *trainer_flags]
    if args.row:
        native_log.load_tensorflow()
        result = run_row(args.row, args.logical_cpus, args.per_replica_batch, args.warmup_epochs, trainer_argv)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    unknown = [s for s in strategies if s not in STRATEGIES]
    problems = [f"--strategies: unknown {unknown}; choose from {STRATEGIES}"] if unknown or not strategies else []
    if args.per_replica_batch <= 0 or args.warmup_epochs < 0 or args.logical_cpus < 2:
        problems.append("--per_replica_batch must be positive, --warmup_epochs >= 0, --logical_cpus >= 2")
    if any(f == "--batch_size" or f.startswith("--batch_size=") or f.startswith("--strategy") for f in trainer_flags):
        problems.append("the bench sets --batch_size (--per_replica_batch times the replicas) and --strategy per row")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    from trainer import config as config_lib

    config_lib.parse_config([*trainer_argv, "--batch_size", str(args.per_replica_batch)])  # bad flags fail here, once
    tf = native_log.load_tensorflow()

    num_gpus = len(tf.config.list_physical_devices("GPU"))
    load_before = os.getloadavg()[0]
    measured = []
    try:
        for row in plan_rows(num_gpus, strategies, args.logical_cpus):
            measured.append((row, measure_row(row, args, trainer_flags)))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    first = measured[0][1]
    print(f"Strategies (chapter 7: an epoch ~100 s on CPU, 55 s on 1 GPU, 29 s on 2 GPUs): one training epoch of "
          f"{first['model']} on {first['examples']} examples of {args.data} ({first['form']} form"
          f"{', %d px' % first['input_size'] if first['input_size'] else ''}), after {args.warmup_epochs} warm-up "
          f"epoch(s), no validation")
    print(format_table(measured))
    print(f"{os.cpu_count()} logical CPUs, {num_gpus} GPU(s); 1-min load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; speed = first row's epoch time / this row's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
