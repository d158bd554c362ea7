"""`--warm_start RUN_DIR`: a new run that starts from an earlier run's best weights.

The book keeps model state so that a model trained on a million images can go on training on
the next thousand instead of starting over. Here the earlier run folder supplies:
- the model flags (MODEL_FLAGS) not given on the command line, from its config.json;
- the weights, from its best checkpoint (run_folder.BEST_WEIGHTS), loaded before the first epoch.
The form, the input and model sizes and the architecture must be the same: anything else is an
error that names the difference. A class list other than the earlier run's is refused unless
`--allow_class_change true`: a list that changed by accident (another dict.txt, a class folder
missing from the new data) would otherwise train silently on shuffled meanings. With the flag,
the output weights of the classes both lists name are kept (matched by name, so a reordered list
keeps all of them) and the others start from their initialisation. A reordered list of the same
classes needs no flag. The optimiser starts afresh, at this run's --lrate.

A rerun of the same command resumes the new run from its own backup: the weights are loaded
only when the run folder has no backup, and the earlier run is not read again.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import tensorflow as tf

from shared import metadata
from trainer import callbacks, config as config_lib, models
from trainer.run_folder import BEST_WEIGHTS, CONFIG_FILE, EXPORT_DIR, read_json
from trainer.serving.contract import CLASS_NAMES_FILE

# Flags that define the model (and its augmentation layers): taken from the earlier run unless given.
MODEL_FLAGS = ("model", "num_hidden", "l1", "l2", "image_size", "crop_ratio", "with_flip", "with_color_distort",
               "hub_handle", "grayscale")
# What must match for the weights to fit: resolved sizes and the flags that shape the layers.
SAME_RESOLVED = ("form", "model", "input_size", "model_size", "embedding_size")
SAME_FLAGS = ("num_hidden", "grayscale")
OUTPUT_LAYER = "probabilities"


@dataclasses.dataclass(frozen=True)
class WarmStart:
    run_dir: str
    checkpoint: str  # <run_dir>/checkpoints/best
    source_classes: tuple[str, ...]
    target_classes: tuple[str, ...]
    source_spec: models.ModelSpec  # the earlier run's model: this run's with its class count

    @property
    def same_classes(self) -> bool:
        return self.source_classes == self.target_classes

    def describe(self) -> dict:
        """What config.json's resolved section records about the start."""
        kept = [c for c in self.target_classes if c in self.source_classes]
        return {"run": self.run_dir, "weights": self.checkpoint, "classes_kept": len(kept),
                "classes_new": [c for c in self.target_classes if c not in self.source_classes],
                "classes_dropped": [c for c in self.source_classes if c not in self.target_classes],
                "source_best_val_accuracy": callbacks.best_so_far(callbacks.read_epoch_log(self.run_dir))}


def read_run_config(run_dir: str) -> dict:
    """A run's config.json ({"flags", "resolved"}); ValueError naming the file if absent or unreadable."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"--warm_start {run_dir}: {path} does not exist; give a run folder that trainer.train wrote")
    return read_json(path, "give a run folder whose config.json trainer.train wrote whole")


def with_model_flags_of_run(config: config_lib.TrainConfig, given: frozenset[str]) -> config_lib.TrainConfig:
    """`config` with each MODEL_FLAGS flag not in `given` taken from the --warm_start run's config.json,
    or, when the job_dir already holds this warm start (a rerun), from its own: the earlier run is
    not read again."""
    source = config.warm_start
    if tf.io.gfile.exists(os.path.join(config.job_dir, CONFIG_FILE)):
        recorded = read_run_config(config.job_dir).get("flags", {})
        if recorded.get("warm_start", "").rstrip("/") == config.warm_start.rstrip("/"):
            source = config.job_dir
    old_flags = read_run_config(source).get("flags", {})
    taken = {k: old_flags[k] for k in MODEL_FLAGS if k not in given and k in old_flags}
    if taken:
        logging.info("--warm_start %s: model flags from %s: %s", config.warm_start, os.path.join(source, CONFIG_FILE),
                     ", ".join(f"{k}={v}" for k, v in taken.items()))
    return dataclasses.replace(config, **taken)


def source_class_names(run_dir: str, resolved: dict) -> tuple[str, ...]:
    """The earlier run's class names: its config.json, else its export's class names file."""
    if resolved.get("class_names"):
        return tuple(resolved["class_names"])
    path = os.path.join(run_dir, EXPORT_DIR, CLASS_NAMES_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            return tuple(line.rstrip("\n") for line in f if line.strip())
    raise ValueError(f"--warm_start {run_dir}: neither its {CONFIG_FILE} nor {path} gives its class names")


def plan(config: config_lib.TrainConfig, spec: models.ModelSpec, meta: metadata.DatasetMetadata,
         resolved: dict, run_dir: str) -> WarmStart:
    """Checks that the earlier run's best weights fit this run's model; ValueError naming each difference."""
    old = read_run_config(run_dir)
    old_flags, old_resolved = old.get("flags", {}), old.get("resolved", {})
    checkpoint = os.path.join(run_dir, BEST_WEIGHTS)
    if not tf.io.gfile.exists(checkpoint + ".index"):
        raise ValueError(f"--warm_start {run_dir}: {checkpoint}.index does not exist (no epoch of that run finished "
                         f"with a {callbacks.MONITOR}); give a run that trained at least one epoch")
    differences = [f"{k} (that run {old_resolved.get(k)!r}, this run {resolved.get(k)!r})"
                   for k in SAME_RESOLVED if old_resolved.get(k) != resolved.get(k)]
    defaults = config_lib.TrainConfig(data="", job_dir="")
    for k in SAME_FLAGS + (("hub_handle",) if spec.kind == "mobilenet" else ()):
        before, now = old_flags.get(k, getattr(defaults, k)), getattr(config, k)
        if before != now:
            differences.append(f"{k} (that run {before!r}, this run {now!r})")
    if differences:
        raise ValueError(f"--warm_start {run_dir}: its weights do not fit this run's model, which differs in "
                         f"{'; '.join(differences)}; a warm start needs the same form, input size and architecture: "
                         f"drop the flags that change them (the earlier run's are used when not given), or train "
                         f"from scratch")
    source_classes = source_class_names(run_dir, old_resolved)
    target_classes = tuple(meta.class_names)
    if set(source_classes) != set(target_classes) and not config.allow_class_change:
        raise ValueError(f"--warm_start {run_dir}: that run's classes differ from this data's: new "
                         f"{[c for c in target_classes if c not in source_classes]}, missing "
                         f"{[c for c in source_classes if c not in target_classes]}; --allow_class_change true keeps "
                         f"the output weights of the classes both name and initialises the new ones")
    return WarmStart(run_dir, checkpoint, source_classes, target_classes,
                     dataclasses.replace(spec, num_classes=len(source_classes)))


def load_weights(model, start: WarmStart) -> None:
    """Loads the earlier run's best weights into `model` (built from this run's spec), remapping the
    output layer's columns by class name when the class lists differ."""
    if start.same_classes:
        model.load_weights(start.checkpoint).expect_partial()  # the optimiser's slots are not carried over
        logging.info("warm start: loaded %s", start.checkpoint)
        return
    source = models.build_model(start.source_spec)
    source.load_weights(start.checkpoint).expect_partial()
    for layer in model.layers:
        if not layer.weights:
            continue
        old = source.get_layer(layer.name).get_weights()
        if layer.name != OUTPUT_LAYER:
            layer.set_weights(old)
            continue
        kernel, bias = layer.get_weights()
        for j, name in enumerate(start.target_classes):
            if name in start.source_classes:
                i = start.source_classes.index(name)
                kernel[:, j], bias[j] = old[0][:, i], old[1][i]
        layer.set_weights([kernel, bias])
    kept = sum(c in start.source_classes for c in start.target_classes)
    logging.info("warm start: loaded %s; output weights of %d of %d classes kept, the others initialised",
                 start.checkpoint, kept, len(start.target_classes))


def recorded_start(job_dir: str) -> dict | None:
    """The warm start a run folder's config.json records (a resumed run keeps it without reading the
    earlier run again), or None."""
    if not tf.io.gfile.exists(os.path.join(job_dir, CONFIG_FILE)):
        return None
    return read_run_config(job_dir).get("resolved", {}).get("warm_start")
