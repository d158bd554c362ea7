"""The trainer's flags: flat, documented defaults, typed, printed and saved into the run folder.

Flag names follow the book's trainer (underscores; `--job-dir` too) so that hyperparameter
services (Vertex AI) can pass them unchanged; booleans take `true`/`false` values as they pass them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Sequence

from shared.hub_handles import MOBILENET_V2_FEATURE_VECTOR

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
MODELS = ("linear", "dnn", "mobilenet")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str  # ETL output folder (holds metadata.json)
    job_dir: str  # one folder per run: config, checkpoints, backup, logs, export
    strategy: str = "auto"  # auto: TPU if one resolves, else mirrored over GPUs, else one device
    model: str = "dnn"  # ignored for the embeddings form, which always gets a dense head
    batch_size: int = 32  # global batch size, split across replicas
    num_epochs: int = 20
    num_training_examples: int = 0  # a virtual epoch's size; 0 = the sidecar's train count
    lrate: float = 0.001  # Adam learning rate
    l1: float = 0.0
    l2: float = 0.0
    num_hidden: int = 16  # units of the hidden layer (dnn, mobilenet and embeddings heads)
    crop_ratio: float = 0.5  # random crop of model_size out of model_size / crop_ratio; 1.0 = no crop
    with_flip: bool = True
    with_color_distort: bool = True
    patience: int = 2  # epochs without val_accuracy gain before early stopping
    hub_handle: str = MOBILENET_V2_FEATURE_VECTOR  # URL or local SavedModel path (mobilenet model)
    image_size: int = 224  # model input size for the jpeg form (pixels: the sidecar's)
    cache: bool = False  # cache parsed records in memory (small datasets only)
    seed: int = 42  # file order, shuffles, initialisation
    grayscale: bool = False  # one channel at the model's input (trainer.grayscale), in the export too
    pattern: str = ""  # train on the shards whose file names match *PATTERN (the book's smoke test); "" = all
    warm_start: str = ""  # an earlier run folder: start from its best weights (trainer.warm_start)
    allow_class_change: bool = False  # with warm_start: a class list other than that run's
    fine_tune_layers: int = 0  # mobilenet: unfreeze the module's top N layers after the head (trainer.fine_tune)
    fine_tune_lrate: float = 0.0001  # a tenth of --lrate's default: small steps keep the pretrained features
    fine_tune_epochs: int = 5  # most epochs of the fine-tuning stage; early stopping may end sooner
    profile_batches: str = ""  # "A,B": TensorBoard's profiler over training steps A..B; "" = off

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OptionListingParser(argparse.ArgumentParser):
    """An ArgumentParser that lists its options: `options` maps each option string to its Action
    (argparse keeps that list private); trainer.tuning checks search spaces against it."""

    def __init__(self, *args, **kwargs):
        self.options: dict[str, argparse.Action] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.update(dict.fromkeys(action.option_strings, action))
        return action


def make_arg_parser() -> OptionListingParser:
    """The parser for `python -m trainer.train`; unknown flags are errors."""
    defaults = TrainConfig(data="", job_dir="")
    p = OptionListingParser(prog="python -m trainer.train", description=__doc__,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--data", required=True, help="ETL output folder (local or gs://) holding metadata.json")
    # Vertex AI sets AIP_MODEL_DIR; an explicit --job_dir wins.
    p.add_argument("--job_dir", "--job-dir", dest="job_dir", default=os.environ.get("AIP_MODEL_DIR"),
                   required=os.environ.get("AIP_MODEL_DIR") is None, help="run folder; rerunning resumes")
    p.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy,
                   help="auto: TPU if one resolves, else mirrored over GPUs, else one device")
    p.add_argument("--model", choices=MODELS, default=defaults.model,
                   help="ignored for the embeddings form, which always gets a dense head")
    p.add_argument("--batch_size", type=whole_number, default=defaults.batch_size,
                   help="global batch size, split across replicas")
    p.add_argument("--num_epochs", type=whole_number, default=defaults.num_epochs,
                   help="most epochs; early stopping may end sooner")
    p.add_argument("--num_training_examples", type=whole_number, default=defaults.num_training_examples,
                   help="a virtual epoch's size; 0 = the sidecar's train count")
    p.add_argument("--lrate", type=float, default=defaults.lrate, help="Adam learning rate")
    p.add_argument("--l1", type=float, default=defaults.l1, help="L1 weight regularisation")
    p.add_argument("--l2", type=float, default=defaults.l2, help="L2 weight regularisation")
    p.add_argument("--num_hidden", type=whole_number, default=defaults.num_hidden,
                   help="units of the hidden layer (dnn, mobilenet and embeddings heads)")
    p.add_argument("--crop_ratio", type=float, default=defaults.crop_ratio,
                   help="random crop of the model size out of image_size / crop_ratio; 1.0 = no crop")
    p.add_argument("--with_flip", type=parse_bool, default=defaults.with_flip, help="random horizontal flip")
    p.add_argument("--with_color_distort", type=parse_bool, default=defaults.with_color_distort,
                   help="random contrast and brightness per image")
    p.add_argument("--patience", type=whole_number, default=defaults.patience,
                   help="epochs without val_accuracy gain before early stopping")
    p.add_argument("--hub_handle", default=defaults.hub_handle,
                   help="feature extractor of the mobilenet model: TF Hub URL or local SavedModel path")
    p.add_argument("--image_size", type=whole_number, default=defaults.image_size,
                   help="model input size for the jpeg form (pixels, embeddings: the sidecar's)")
    p.add_argument("--cache", type=parse_bool, nargs="?", const=True, default=defaults.cache,
                   help="cache parsed records in memory (small datasets only)")
    p.add_argument("--seed", type=whole_number, default=defaults.seed, help="file order, shuffles, initialisation")
    p.add_argument("--grayscale", type=parse_bool, default=defaults.grayscale,
                   help="convert images to one grayscale channel at the model's input (the export does it too); "
                        "for documents and digits")
    p.add_argument("--pattern", default=defaults.pattern,
                   help="train, validate and test on the shards whose file names match *PATTERN (fnmatch), e.g. "
                        "'-00000-*' for a smoke test; empty: every shard")
    p.add_argument("--warm_start", default=defaults.warm_start, metavar="RUN_DIR",
                   help="start from the best weights of this earlier run folder; its config.json gives the model "
                        "flags not given here")
    p.add_argument("--allow_class_change", type=parse_bool, default=defaults.allow_class_change,
                   help="with --warm_start: train on a class list other than that run's, keeping the output weights "
                        "of the classes both lists name and initialising the others")
    p.add_argument("--fine_tune_layers", type=whole_number, default=defaults.fine_tune_layers, metavar="N",
                   help="mobilenet: after training the head with the module frozen, unfreeze the module's top N "
                        "layers and go on training at --fine_tune_lrate (batch-norm statistics stay frozen); 0 = never")
    p.add_argument("--fine_tune_lrate", type=float, default=defaults.fine_tune_lrate,
                   help="Adam learning rate of the fine-tuning stage")
    p.add_argument("--fine_tune_epochs", type=whole_number, default=defaults.fine_tune_epochs,
                   help="most epochs of the fine-tuning stage; early stopping may end sooner")
    p.add_argument("--profile_batches", type=step_range, default=defaults.profile_batches, metavar="A,B",
                   help="profile training steps A to B with TensorBoard's profiler (logs/plugins/profile); "
                        "empty: off")
    return p


def step_range(text: str) -> str:
    """'A,B' (or 'A') with 1 <= A <= B, normalised to 'A,B'; '' stays '' (off)."""
    if not text.strip():
        return ""
    parts = [p.strip() for p in text.split(",")]
    try:
        first, last = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        first, last = 0, -1
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"expected steps A,B with 1 <= A <= B (e.g. 10,20), got {text!r}")
    return f"{first},{last}"


def profile_range(text: str) -> tuple[int, int] | None:
    """The (first, last) steps of --profile_batches, or None when profiling is off."""
    return tuple(int(p) for p in text.split(",")) if text else None


def join_dash_values(argv: Sequence[str] | None) -> list[str]:
    """`--pattern -00000-*` -> `--pattern=-00000-*`: argparse takes a separate value that starts with
    '-' for an option and fails, and the book's smoke-test pattern starts with one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = []
    for token in argv:
        if out and out[-1] == "--pattern" and token.startswith("-") and not token.startswith("--"):
            out[-1] = f"--pattern={token}"
        else:
            out.append(token)
    return out


def given_flags(argv: Sequence[str] | None = None) -> frozenset[str]:
    """The destinations of the flags `argv` sets explicitly (a default is not "given"): a warm start
    takes the model flags that are not given from the earlier run."""
    argv = join_dash_values(argv)
    parser = make_arg_parser()
    unset = object()
    parser.set_defaults(**{dest: unset for dest in vars(parser.parse_args(argv))})
    return frozenset(dest for dest, value in vars(parser.parse_args(argv)).items() if value is not unset)


def whole_number(text: str) -> int:
    """An int flag's value; "16.0" too, since Vertex AI's tuning service passes DISCRETE values as
    floats ("--batch_size=16.0"), which argparse's int refuses, failing every trial."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parses and validates flags; a value out of range is an error that names the flag."""
    parser = make_arg_parser()
    args = parser.parse_args(join_dash_values(argv))
    config = TrainConfig(**vars(args))
    problems = []
    if config.batch_size <= 0:
        problems.append(f"--batch_size must be positive, got {config.batch_size}")
    if config.num_epochs <= 0:
        problems.append(f"--num_epochs must be positive, got {config.num_epochs}")
    if config.num_training_examples < 0:
        problems.append(f"--num_training_examples must be >= 0, got {config.num_training_examples}")
    if not 0.0 < config.crop_ratio <= 1.0:
        problems.append(f"--crop_ratio must be in (0, 1], got {config.crop_ratio}")
    # Written so that NaN fails too ("nan" parses as a float, and every comparison with it is false):
    # --lrate nan trained a whole epoch before its NaN loss stopped the run.
    if not 0 < config.lrate < math.inf:
        problems.append(f"--lrate must be a positive number, got {config.lrate}")
    if not (0 <= config.l1 < math.inf and 0 <= config.l2 < math.inf):
        problems.append(f"--l1 and --l2 must be numbers >= 0, got {config.l1}, {config.l2}")
    if config.num_hidden <= 0:
        problems.append(f"--num_hidden must be positive, got {config.num_hidden}")
    if config.image_size < 32:
        problems.append(f"--image_size must be at least 32, got {config.image_size}")
    if config.patience < 0:
        problems.append(f"--patience must be >= 0, got {config.patience}")
    if config.fine_tune_layers < 0:
        problems.append(f"--fine_tune_layers must be >= 0, got {config.fine_tune_layers}")
    if not 0 < config.fine_tune_lrate < math.inf:
        problems.append(f"--fine_tune_lrate must be a positive number, got {config.fine_tune_lrate}")
    if config.fine_tune_epochs <= 0:
        problems.append(f"--fine_tune_epochs must be positive, got {config.fine_tune_epochs}")
    if config.allow_class_change and not config.warm_start:
        problems.append("--allow_class_change applies to a --warm_start; give the run folder to start from")
    if config.warm_start and config.warm_start.rstrip("/") == config.job_dir.rstrip("/"):
        problems.append(f"--warm_start {config.warm_start} is the --job_dir itself; rerunning a run folder resumes "
                        f"it: drop --warm_start, or give a new --job_dir")
    if not 0 <= config.seed < 2**32:
        problems.append(f"--seed must be in [0, 2**32), got {config.seed}")
    # tf.train.latest_checkpoint and the checkpoint reader match the path as a glob pattern: '*' and '?'
    # match themselves, but '[1]' is a character class, so 'runs/lr[1]' trained, then failed with
    # 'Failed to find any matching files for runs/lr[1]/checkpoints/best'.
    if "[" in config.job_dir:
        problems.append(f"--job_dir {config.job_dir!r} holds '[': TensorFlow reads checkpoint paths as glob patterns, "
                        f"so the run would train and then not find its checkpoints; choose a name without '['")
    if problems:
        parser.error("; ".join(problems))
    return config
