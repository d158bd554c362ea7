"""`python -m trainer.train --data DIR --job_dir RUN`: train, keep the best weights, export, report.

The run folder (its files: trainer.run_folder) holds everything, so rerunning the same command
resumes a crashed run, goes straight to evaluation and export when only those failed, and returns
the metrics of a finished one (other flags are refused in each case).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

from shared import native_log
from trainer import config as config_lib

if __name__ == "__main__":  # --help and flag errors answer before TensorFlow loads (~5 s); main() parses again
    config_lib.parse_config()
    native_log.load_tensorflow()

import tensorflow as tf
import tf_keras as keras

from shared import layout, metadata
from trainer import (callbacks, config as config_lib, export, fine_tune, hypertune_report, ingest, models, plots,
                     shard_pattern, strategy as strategy_lib, warm_start)
from trainer.run_folder import (BACKUP_DIR, BEST_WEIGHTS, CONFIG_FILE, CURVES_FILE, EPOCH_LOG_FILE, EXPORT_DIR,
                                HISTORY_FILE, METRICS_FILE, TRAINED_FILE, read_json, write_json)

TPU_STEPS_PER_EXECUTION = 32  # the book's value: batches sent to the TPU per call


def resolve_model_spec(config: config_lib.TrainConfig, meta: metadata.DatasetMetadata) -> models.ModelSpec:
    """Model kind and shapes from the flags and the sidecar (no shape is typed twice)."""
    common = dict(num_classes=len(meta.class_names), num_hidden=config.num_hidden, l1=config.l1, l2=config.l2,
                  hub_handle=config.hub_handle, fine_tune_layers=config.fine_tune_layers)
    fine_tune.check_fine_tune(config, models.EMBEDDINGS_HEAD if meta.form == "embeddings" else config.model)
    if meta.form == "embeddings":
        if config.grayscale:
            raise ValueError("--grayscale converts images at the model's input; the embeddings form's model takes "
                             "the module's vectors: train on the jpeg or pixels form, or drop --grayscale")
        if config.model != "dnn":
            logging.warning("--model %s ignored: the embeddings form always trains a dense head", config.model)
        return models.ModelSpec(models.EMBEDDINGS_HEAD, input_size=None, model_size=None,
                                embedding_size=int(meta.payload.shape[0]), with_flip=False,
                                with_color_distort=False, **common)
    input_size = ingest.input_image_size(meta, config.image_size, config.crop_ratio)
    model_size = config.image_size if meta.form == "jpeg" else ingest.model_image_size(input_size, config.crop_ratio)
    if meta.form == "pixels" and config.image_size not in (input_size, model_size):
        logging.warning("--image_size %d ignored: the pixels form's images are %d px (the sidecar's), and the model "
                        "sees %d px crops of them (--crop_ratio %g); re-run the ETL with --image_size to change it",
                        config.image_size, input_size, model_size, config.crop_ratio)
    return models.ModelSpec(config.model, input_size=input_size, model_size=model_size, grayscale=config.grayscale,
                            with_flip=config.with_flip, with_color_distort=config.with_color_distort, **common)


def chance_warning(val_accuracy: float | None, num_classes: int) -> str | None:
    """A warning when the validation accuracy is within 1.5x of guessing (1/num_classes), else None:
    such a run exits 0 like any other (the book's default dnn does this on the digits for some seeds)."""
    chance = 1.0 / max(1, num_classes)
    if val_accuracy is None or val_accuracy > 1.5 * chance:
        return None
    return (f"val_accuracy {val_accuracy:.3f} is about chance (1/{num_classes} classes = {chance:.3f}): the model "
            f"learned little; try another --lrate or --seed, more --num_hidden, or more epochs")


def _backup_checkpoint(job_dir: str) -> str | None:
    """BackupAndRestore's latest complete checkpoint (its manager writes to backup/chief), or None."""
    return tf.train.latest_checkpoint(os.path.join(job_dir, BACKUP_DIR, "chief"))


def _backup_exists(job_dir: str) -> bool:
    return _backup_checkpoint(job_dir) is not None


def restored_epochs(job_dir: str, steps_per_epoch: int, save_freq: str | int = callbacks.BACKUP_SAVE_FREQ) -> int:
    """The epochs BackupAndRestore's checkpoint holds whole, i.e. the epoch it resumes at (0 without one).

    As tf_keras decides (WorkerTrainingState.maybe_load_initial_counters_from_ckpt): the checkpoint holds
    `ckpt_saved_epoch`, the epoch running at the save, and `ckpt_saved_batch`, the batch running then
    (-1 unless some callback turned on batch hooks: a progress bar, profiling). With per-epoch saves
    it resumes at epoch + 1 whatever the batch; with saves every `save_freq` batches, inside `epoch`
    after `batch`, or at epoch + 1 when that batch was the epoch's last. (The trainer does not turn on
    save_before_preemption, which would resume mid-epoch too.)"""
    if _backup_checkpoint(job_dir) is None:
        return 0
    reader = tf.train.load_checkpoint(os.path.join(job_dir, BACKUP_DIR, "chief"))
    epoch_key, batch_key = "ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE", "ckpt_saved_batch/.ATTRIBUTES/VARIABLE_VALUE"
    if not (reader.has_tensor(epoch_key) and reader.has_tensor(batch_key)):
        return 0
    epoch, batch = int(reader.get_tensor(epoch_key)), int(reader.get_tensor(batch_key))
    if epoch < 0:
        return 0
    resumes_mid_epoch = isinstance(save_freq, int) and 0 <= batch < steps_per_epoch - 1
    return epoch if resumes_mid_epoch else epoch + 1


def _comparable_flags(flags: dict) -> dict:
    """The flags with folder paths' trailing slashes removed: shell completion adds one (`runs/r1/`),
    and the rerun of `--job_dir runs/r1` with it names the same folders."""
    return {k: v.rstrip("/") if k in ("data", "job_dir") and isinstance(v, str) else v for k, v in flags.items()}


def _refuse_other_flags(config: config_lib.TrainConfig, what: str) -> None:
    """ValueError naming each flag that differs from the run already in job_dir (its config.json)."""
    path = os.path.join(config.job_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return
    old = _comparable_flags(read_json(path, "delete it and rerun the same command, which writes it again "
                                            "(without comparing flags with the old run)").get("flags", {}))
    # A flag added after the run started is absent from its config.json: it ran with the default.
    old = dataclasses.asdict(config_lib.TrainConfig(data="", job_dir="")) | old
    changed = {k: (old.get(k), v) for k, v in _comparable_flags(dataclasses.asdict(config)).items() if old.get(k) != v}
    if changed:
        raise ValueError(f"{config.job_dir} holds {what} with other flags (old, new): {changed}; "
                         f"rerun with the same flags, or use another --job_dir")


def _prepare_job_dir(config: config_lib.TrainConfig, resolved: dict, resuming: bool, is_chief: bool) -> None:
    """Refuses to resume a run with other flags; writes config.json; clears a stale epoch log."""
    path = os.path.join(config.job_dir, CONFIG_FILE)
    if resuming:
        _refuse_other_flags(config, "an interrupted run")
    if not is_chief:
        return
    try:
        tf.io.gfile.makedirs(config.job_dir)
        # Whole: a resuming chief rewrites it while the other workers read it.
        write_json(path, {"flags": dataclasses.asdict(config), "resolved": resolved})
    except tf.errors.OpError as e:  # a path under a file, a read-only folder, a bucket without write access
        raise ValueError(f"--job_dir {config.job_dir} cannot be written ({type(e).__name__}: {e.message}); "
                         f"give a folder this process can create and write") from None
    log_path = os.path.join(config.job_dir, EPOCH_LOG_FILE)
    if not resuming and tf.io.gfile.exists(log_path):
        tf.io.gfile.remove(log_path)  # a previous run that finished training but not its export


def _fit(model, train_ds, valid_ds, config, steps_per_epoch, cbs, meta, epochs):
    try:
        return model.fit(train_ds, validation_data=valid_ds, epochs=epochs,
                         steps_per_epoch=steps_per_epoch, callbacks=cbs, verbose=2)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        bad = ingest.find_corrupt_shards(meta, config.data, ("train", "valid"))
        if bad:
            raise metadata.DatasetError("corrupt shard(s): " + "; ".join(bad)) from e
        raise


def evaluate_best(spec: models.ModelSpec, meta: metadata.DatasetMetadata, config: config_lib.TrainConfig,
                  input_size: int | None) -> tuple[object, dict]:
    """A plain (undistributed) copy of the model with the best checkpoint's weights, and its accuracy
    on the validation and test splits: the exported weights are the ones measured."""
    model = models.build_model(spec)
    checkpoint = os.path.join(config.job_dir, BEST_WEIGHTS)
    if not tf.io.gfile.exists(checkpoint + ".index"):
        raise FileNotFoundError(f"{checkpoint}.index does not exist: no epoch finished with a {callbacks.MONITOR}")
    model.load_weights(checkpoint).expect_partial()  # the optimiser's slots are not needed to predict
    models.compile_model(model, config.lrate)
    metrics = {}
    for split, prefix in (("valid", "val_"), ("test", "test_")):
        if ingest.count_examples(meta, split):
            ds = ingest.make_eval_dataset(meta, config.data, split, config.batch_size, input_size=input_size)
            try:
                loss, accuracy = model.evaluate(ds, verbose=0)
            except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
                bad = ingest.find_corrupt_shards(meta, config.data, (split,))
                if bad:
                    raise metadata.DatasetError("corrupt shard(s): " + "; ".join(bad) + f"; the training is kept in "
                                                f"{config.job_dir}: rerun to evaluate and export") from e
                raise
            metrics[prefix + "loss"], metrics[prefix + "accuracy"] = float(loss), float(accuracy)
            metrics[prefix + "examples"] = ingest.count_examples(meta, split)
    return model, metrics


def train_and_export(config: config_lib.TrainConfig, placement: strategy_lib.Placement | None = None) -> dict:
    """Trains per `config`, exports the best weights to `<job_dir>/export`, returns the metrics.

    On a non-chief worker it trains and returns {} (the chief measures, writes and exports).
    `placement`: the strategy already made in this process (a fine-tuning run's second stage).
    """
    # First: multi-worker must start before other TF work.
    placement = placement or strategy_lib.get_strategy(config.strategy)
    if tf.io.gfile.exists(config.job_dir) and not tf.io.gfile.isdir(config.job_dir):
        raise ValueError(f"--job_dir {config.job_dir} is a file; give a folder (it is created if missing)")
    metrics_path = os.path.join(config.job_dir, METRICS_FILE)
    if tf.io.gfile.exists(metrics_path) and tf.io.gfile.exists(os.path.join(config.job_dir, EXPORT_DIR, "saved_model.pb")):
        # Every worker sees this, so none of them starts training alone (it would wait for the others).
        _refuse_other_flags(config, "a finished run")  # new flags silently ignored would look like a result
        metrics = read_json(metrics_path, "delete it and rerun: the run's best weights are evaluated and exported again")
        logging.info("%s is a finished run with these flags; its metrics: %s", config.job_dir, json.dumps(metrics))
        return metrics if placement.is_chief else {}

    meta = shard_pattern.select_shards(ingest.load_dataset_metadata(config.data), config.pattern, config.data)
    spec = resolve_model_spec(config, meta)
    # The export puts the ETL's module in front of the model: loaded now, so that one that does not
    # load (a URL offline, a path relative to another folder) stops the run before training, not after.
    embedder = export.load_embedder(meta) if meta.form == "embeddings" else None
    if config.batch_size % placement.num_replicas:
        raise ValueError(f"Batch size ({config.batch_size}) must be divisible by the number of replicas "
                         f"({placement.num_replicas}) of strategy {placement.name}")
    warm_source = config.warm_start
    if config.fine_tune_layers and not warm_source:
        fine_tune.check_module_layers(config.hub_handle, config.fine_tune_layers)
        head = fine_tune.head_stage_config(config)
        logging.info("fine-tuning: first the head, with the module frozen, in %s", head.job_dir)
        train_and_export(head, placement)
        warm_source = head.job_dir
    lrate, num_epochs = fine_tune.stage_schedule(config)
    num_train = config.num_training_examples or meta.splits["train"].num_examples
    steps_per_epoch = max(1, num_train // config.batch_size)
    on_tpu = placement.name == "tpu"
    resuming = _backup_exists(config.job_dir)
    resolved = {"strategy": placement.name, "num_replicas": placement.num_replicas,
                "global_batch_size": config.batch_size,
                "per_replica_batch_size": config.batch_size // placement.num_replicas,
                "num_workers": placement.shard.num_workers, "form": meta.form, "model": spec.kind,
                "input_size": spec.input_size, "model_size": spec.model_size, "embedding_size": spec.embedding_size,
                "num_classes": spec.num_classes, "steps_per_epoch": steps_per_epoch,
                "virtual_epoch_examples": steps_per_epoch * config.batch_size,
                "train_examples_in_data": meta.splits["train"].num_examples, "lrate": lrate, "num_epochs": num_epochs,
                "class_names": list(meta.class_names)}
    if config.pattern:
        resolved["pattern_shards_and_examples"] = shard_pattern.describe(meta)
    logging.info("strategy %s: global batch size %d = %d replicas x %d per replica, %d worker(s)",
                 placement.name, config.batch_size, placement.num_replicas, resolved["per_replica_batch_size"],
                 placement.shard.num_workers)
    logging.info("resolved: %s", json.dumps(resolved))
    trained_path = os.path.join(config.job_dir, TRAINED_FILE)
    warm = None
    if warm_source and not (resuming or tf.io.gfile.exists(trained_path)):
        warm = warm_start.plan(config, spec, meta, resolved, warm_source)
        resolved["warm_start"] = warm.describe()
    elif warm_source:  # this run's own state takes over: the earlier run is not read again
        resolved["warm_start"] = warm_start.recorded_start(config.job_dir)
    if tf.io.gfile.exists(trained_path):
        # Training finished but evaluation or export failed (a corrupt test shard, a hub module that
        # did not load): BackupAndRestore has deleted its backup, so without this the rerun would
        # train again from scratch.
        _refuse_other_flags(config, "a trained run")
        trained = read_json(trained_path, "replace it with {} to evaluate and export the trained weights, "
                                          "or delete it to train again")
        logging.info("%s was trained (%s: %s); evaluating and exporting its best weights", config.job_dir,
                     TRAINED_FILE, json.dumps(trained))
        return _evaluate_and_export(config, meta, spec, resolved, embedder) if placement.is_chief else {}
    _prepare_job_dir(config, resolved, resuming, placement.is_chief)
    done_epochs = restored_epochs(config.job_dir, steps_per_epoch) if resuming else 0
    # A restarted run's input stream and augmentation draws start again from their seeds; with the
    # same seeds its epochs would replay the first epochs' batches and crops. Offset by the epochs
    # the backup holds (the same on every worker), so a resumed run goes on to new draws.
    seed = (config.seed + done_epochs) % 2**32
    if resuming:
        logging.info("%s/backup holds %d epoch(s): resuming the interrupted run, input and augmentation "
                     "seeded with %d", config.job_dir, done_epochs, seed)

    train_ds = ingest.make_train_dataset(meta, config.data, config.batch_size, input_size=spec.input_size,
                                         seed=seed, cache=config.cache, drop_remainder=on_tpu,
                                         shard=placement.shard)
    valid_ds = ingest.make_eval_dataset(meta, config.data, "valid", config.batch_size, input_size=spec.input_size,
                                        drop_remainder=on_tpu, shard=placement.shard)
    keras.utils.set_random_seed(seed)  # initialisation (restored over when resuming) and augmentation draws
    with placement.strategy.scope():
        model = models.build_model(spec)
        models.compile_model(model, lrate, TPU_STEPS_PER_EXECUTION if on_tpu else 1)
    if warm is not None:
        warm_start.load_weights(model, warm)
    cbs = callbacks.make_callbacks(config.job_dir, config.patience, placement.is_chief, done_epochs,
                                   profile_batches=config_lib.profile_range(config.profile_batches))
    start = time.time()
    _fit(model, train_ds, valid_ds, config, steps_per_epoch, cbs, meta, num_epochs)
    logging.info("training took %.1f s", time.time() - start)
    if not placement.is_chief:
        return {}
    write_json(trained_path, {"seconds": round(time.time() - start, 1)})
    return _evaluate_and_export(config, meta, spec, resolved, embedder)


def _evaluate_and_export(config: config_lib.TrainConfig, meta: metadata.DatasetMetadata, spec: models.ModelSpec,
                         resolved: dict, embedder=None) -> dict:
    """After training (chief only): measure the best weights, write history, curves and the export,
    then metrics.json, whose presence with the export marks the run finished."""
    metrics_path = os.path.join(config.job_dir, METRICS_FILE)
    entries = callbacks.read_epoch_log(config.job_dir)
    history = callbacks.history_from_log(entries)
    best = max(entries, key=lambda e: e.get(callbacks.MONITOR, float("-inf")))
    export_model, metrics = evaluate_best(spec, meta, config, spec.input_size)
    metrics.update({"best_epoch": best["epoch"] + 1, "best_epoch_val_accuracy": best.get(callbacks.MONITOR),
                    "epochs_run": len(entries), "model": spec.kind, "form": meta.form})
    warning = chance_warning(metrics.get("val_accuracy"), len(meta.class_names))
    if warning:  # exported anyway: the run did what it was asked, and the numbers are in metrics.json
        logging.warning("%s", warning)
    write_json(os.path.join(config.job_dir, HISTORY_FILE), history)
    plots.plot_training_curves(history, os.path.join(config.job_dir, CURVES_FILE),
                               title=f"{spec.kind} on {meta.form} ({os.path.basename(config.data.rstrip('/'))})")
    with tf.io.gfile.GFile(layout.join(config.data, layout.METADATA_FILE)) as f:
        sidecar_json = f.read()
    export.export_model(export_model, meta, os.path.join(config.job_dir, EXPORT_DIR), input_size=spec.input_size,
                        dataset_sidecar_json=sidecar_json, embedder=embedder,
                        train_info={"flags": dataclasses.asdict(config), "resolved": resolved, "metrics": metrics})
    # The trial's result under Vertex AI tuning (a no-op elsewhere): the exported weights' accuracy.
    hypertune_report.report_metric(metrics.get("val_accuracy", float("nan")), metrics["epochs_run"])
    # metrics.json last: its presence (with the export) marks a finished run.
    write_json(metrics_path, metrics)
    logging.info("metrics of the exported weights: %s", json.dumps(metrics))
    return metrics


def configure_logging() -> None:
    """The project's INFO lines and every library's warnings on stderr, once each, but not absl's INFO
    lines: TensorFlow's checkpoint code writes one at every save ("Sharding callback duration: 8
    microseconds"), so two per epoch, and the SavedModel writer one per renamed input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)
    tf_logger = tf.get_logger()  # it has a handler of its own and also passes its lines to the root's
    for handler in list(tf_logger.handlers):
        tf_logger.removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    config = config_lib.parse_config(argv)
    try:
        if config.warm_start:
            config = warm_start.with_model_flags_of_run(config, config_lib.given_flags(argv))
        logging.info("config: %s", config.to_json().replace("\n", " "))
        train_and_export(config)
    except (metadata.DatasetError, ValueError, FileNotFoundError, FloatingPointError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
