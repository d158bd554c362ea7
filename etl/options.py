"""The ETL's own flags. Unknown flags are Beam's (`--runner`, `--project`, `--labels key=value`, ...) and
pass through. TensorFlow-free, and Beam loads only to check flags meant for it (or a gs:// --labels),
so that `--help` and flag errors answer at once."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
from typing import Sequence

from shared import image_check, schema
from shared.hub_handles import MOBILENET_V2_FEATURE_VECTOR
from shared.paths import is_remote



@dataclasses.dataclass(frozen=True)
class EtlConfig:
    input: str  # CSV of path,label rows, or a folder with one sub-folder per class (local or gs://)
    output: str  # dataset folder; must be empty or absent unless overwrite
    form: str = "jpeg"  # jpeg | pixels | embeddings
    class_names_file: str | None = None  # one class per line; fixes the class order (default: sorted labels)
    image_size: int = 224  # pixels form: side of the square; embeddings: used if the module has no static size
    shard_mb: float = 100.0  # target shard size; the book's 10-100 MB sweet spot for reads
    min_shards: int = 1  # floor per split, so that multi-worker readers each get files
    split: tuple[float, float, float] = (80.0, 10.0, 10.0)  # train, valid, test weights
    embedding_module: str = MOBILENET_V2_FEATURE_VECTOR  # without network: a local path, checked at start
    embedding_batch_size: int = 32  # images per module call
    max_pixels: int = image_check.DEFAULT_MAX_PIXELS  # refuse from the header above this
    max_file_mb: float = 64.0  # refuse files larger than this before reading them whole
    max_reject_fraction: float = 0.5  # fail (publishing nothing) when more of the input is bad
    jpeg_quality: int = 95  # for inputs that are re-encoded (PNG, GIF, BMP, grayscale or CMYK JPEG)
    overwrite: bool = False
    progress_seconds: float = 10.0  # a progress line this often on the local runner; 0 = none

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_mb * 1024 * 1024)


def _split_weights(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split takes three numbers like 80,10,10, got {text!r}") from None
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or parts[0] <= 0:
        raise argparse.ArgumentTypeError(f"--split takes three non-negative weights with train > 0, got {text!r}")
    return parts


def make_arg_parser() -> argparse.ArgumentParser:
    d = EtlConfig(input="", output="")
    p = argparse.ArgumentParser(prog="python -m etl", description="Labelled images to sharded TFRecords.",
                                epilog="Any other flag is passed to Beam, e.g. --runner DataflowRunner --project P.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--input", required=True, help="CSV of path,label rows, or a folder of class sub-folders")
    p.add_argument("--output", required=True, help="dataset folder (local or gs://)")
    p.add_argument("--form", choices=schema.FORMS, default=d.form,
                   help="jpeg: RGB JPEG bytes; pixels: float32 in [0, 1], resized; embeddings: a module's vectors")
    p.add_argument("--class_names_file", default=d.class_names_file,
                   help="file with one class name per line (fixes the order); the old spelling --labels FILE "
                        "still works for an existing file, while --labels key=value are Beam's Dataflow job labels")
    p.add_argument("--image_size", type=int, default=d.image_size,
                   help="side of the square pixels; embeddings: used if the module has no static size")
    p.add_argument("--shard_mb", type=float, default=d.shard_mb, help="target shard size in MB")
    p.add_argument("--min_shards", type=int, default=d.min_shards,
                   help="floor on shards per split, so that each multi-worker reader gets files")
    p.add_argument("--split", type=_split_weights, default=d.split, help="train,valid,test weights")
    p.add_argument("--embedding_module", default=d.embedding_module, help="TF Hub URL or local SavedModel path")
    p.add_argument("--embedding_batch_size", type=int, default=d.embedding_batch_size, help="images per module call")
    p.add_argument("--max_pixels", type=int, default=d.max_pixels,
                   help="refuse an image whose header claims more pixels (it is never decoded)")
    p.add_argument("--max_file_mb", type=float, default=d.max_file_mb, help="refuse larger files without reading them")
    p.add_argument("--max_reject_fraction", type=float, default=d.max_reject_fraction,
                   help="fail, publishing nothing, when more of the input is bad")
    p.add_argument("--jpeg_quality", type=int, default=d.jpeg_quality,
                   help="for inputs re-encoded as JPEG (PNG, GIF, BMP, grayscale or CMYK JPEG)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous ETL output (a folder holding other files is refused)")
    p.add_argument("--progress_seconds", type=float, default=d.progress_seconds,
                   help="log images read, records written and rejects this often on the local runner; 0: never")
    return p


def parse_etl_args(argv: Sequence[str], check_beam_flags: bool = True) -> tuple[EtlConfig, list[str]]:
    """(the ETL's config, the remaining flags for Beam). Bad values are errors naming the flag (exit 2).
    `check_beam_flags=False` leaves `refuse_unknown_beam_flags` (which loads Beam) to the caller."""
    parser = make_arg_parser()
    argv, old_spelling, problems = take_labels_files(argv)
    args, beam_args = parser.parse_known_args(argv)
    config = EtlConfig(**vars(args))
    if old_spelling:
        if len(old_spelling) > 1 or config.class_names_file:
            given = [f"--labels {path}" for path in old_spelling] + (
                [f"--class_names_file {config.class_names_file}"] if config.class_names_file else [])
            problems.append(f"give the class names file once, as --class_names_file (got {', '.join(given)})")
        else:
            logging.info("--labels %s: read as --class_names_file (the old spelling of that flag)", old_spelling[0])
            config = dataclasses.replace(config, class_names_file=old_spelling[0])
    if config.image_size < 1:
        problems.append(f"--image_size must be positive, got {config.image_size}")
    if not 0 < config.shard_mb < math.inf:
        problems.append(f"--shard_mb must be a positive number, got {config.shard_mb}")
    if config.min_shards < 1:
        problems.append(f"--min_shards must be at least 1, got {config.min_shards}")
    if not 0.0 <= config.max_reject_fraction <= 1.0:
        problems.append(f"--max_reject_fraction must be in [0, 1], got {config.max_reject_fraction}")
    if config.max_pixels < 1 or not 0 < config.max_file_mb < math.inf:
        problems.append(f"--max_pixels and --max_file_mb must be positive, got {config.max_pixels}, "
                        f"{config.max_file_mb}")
    if not 1 <= config.jpeg_quality <= 100:
        problems.append(f"--jpeg_quality must be in 1..100, got {config.jpeg_quality}")
    if not 0 <= config.progress_seconds < math.inf:
        problems.append(f"--progress_seconds must be a number >= 0, got {config.progress_seconds}")
    if config.embedding_batch_size < 1:
        problems.append(f"--embedding_batch_size must be positive, got {config.embedding_batch_size}")
    # Local paths are stored absolute in the sidecar: the trainer loads the module from its own
    # working directory, where "../mod32" names another folder or none.
    for name in ("input", "class_names_file", "embedding_module"):
        value = getattr(config, name)
        if value and not is_remote(value) and os.path.exists(value):
            config = dataclasses.replace(config, **{name: os.path.abspath(value)})
    if check_beam_flags:
        problems.extend(_unknown_flags_problem(beam_args))
    if problems:
        parser.error("; ".join(problems))
    return config, beam_args


def refuse_unknown_beam_flags(beam_args: Sequence[str]) -> None:
    """Exits 2, as a flag error, when a flag is neither the ETL's nor Beam's."""
    problems = _unknown_flags_problem(beam_args)
    if problems:
        make_arg_parser().error(problems[0])


def _unknown_flags_problem(beam_args: Sequence[str]) -> list[str]:
    unknown = _flags_unknown_to_beam(beam_args)
    if not unknown:
        return []
    ours = [f"--{field.name}" for field in dataclasses.fields(EtlConfig)]
    hints = [f"{flag} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
        flag.replace("-", "_").replace("__", "--"), ours, n=1)) else flag for flag in unknown]
    return [f"unknown flag(s) {', '.join(hints)}: neither the ETL's nor Beam's"]


def take_labels_files(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """(argv without the `--labels FILE` flags that name the class names file, those FILEs, problems).

    `--labels` was the ETL's name for --class_names_file, and is Beam's for Dataflow job labels
    (`key=value`, or a JSON object). A value with "=" or "{" is Beam's; an existing file (local, or
    an object on gs://) is the class names file; anything else is refused, since either reading could
    be meant (a mistyped path would otherwise become a job label and the class order silently change).
    """
    kept, files, problems = [], [], []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        arg = tokens[i]
        if arg == "--labels" and i + 1 < len(tokens):
            value, given = tokens[i + 1], tokens[i:i + 2]
        elif arg.startswith("--labels="):
            value, given = arg.split("=", 1)[1], [arg]
        else:
            kept.append(arg)
            i += 1
            continue
        i += len(given)
        if "=" in value or value.lstrip().startswith("{"):
            kept.extend(given)
        elif _is_existing_file(value):
            files.append(value)
        else:
            problems.append(f"--labels {value} is neither an existing file (the class names file, now "
                            f"--class_names_file) nor a Dataflow job label (Dataflow job labels are key=value, or key= "
                            "for one without a value)")
    return kept, files, problems


def _is_existing_file(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    from apache_beam.io.filesystems import FileSystems

    try:
        return FileSystems.exists(path)  # an object: object stores have no folders
    except Exception:  # an unreachable store: not known to be a file
        return False


def _flags_unknown_to_beam(beam_args: Sequence[str]) -> list[str]:
    """The flags in `beam_args` that no Beam option class knows: Beam would only log
    "Discarding unparseable args" and run with defaults (a mistyped --shard-mb did so)."""
    if not beam_args:  # no need to load Beam (~1.2 s) to know that
        return []
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(list(beam_args))
    names = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    flags = [arg.split("=", 1)[0] for arg in beam_args if arg.startswith("--")]
    return [flag for flag in flags if flag[2:].replace("-", "_") in names]
