"""What the driver checks before the pipeline is built: flags, the class names file, the input, an
--output inside the input, and the output folder (`publish.check_output`).

Free of TensorFlow and Beam (Beam loads only for a gs:// path or a flag meant for Beam), so that a
refusal answers in well under 2 s instead of after ~7 s of imports.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Sequence

from etl import publish
from etl.errors import EtlError
from etl.options import EtlConfig, parse_etl_args, refuse_unknown_beam_flags
from shared.paths import is_remote


@dataclasses.dataclass(frozen=True)
class CheckedRun:
    config: EtlConfig
    beam_args: list[str]  # the flags left for Beam
    class_names: list[str] | None  # from --class_names_file; None: the sorted labels of the input
    folder_input: bool  # --input is a folder of class sub-folders, not a CSV


def check_run(argv: Sequence[str]) -> CheckedRun:
    """Parses the flags (a bad one exits 2, as argparse does) and raises EtlError for a class names
    file that cannot be used, an --input that does not exist, an --output inside a class-folder
    --input, or an --output that cannot take the dataset (publish.OutputNotEmptyError; checked again
    when the run claims it). Beam's flags are checked last: that loads Beam (~1.2 s), and `make etl`
    always passes some."""
    config, beam_args = parse_etl_args(argv, check_beam_flags=False)
    class_names = read_class_names_file(config.class_names_file) if config.class_names_file else None
    if not _exists(config.input):
        raise EtlError(f"--input {config.input} does not exist (a CSV of path,label rows, or a folder of "
                       "class sub-folders)")
    folder_input = is_folder_input(config.input)
    if folder_input and lies_under(config.output, config.input):
        # Its shards, sidecar and rejects would be listed as images of a class named after the
        # output folder on the next run (`make etl` always passes --overwrite): a class with no
        # records, shifting the indices of the classes sorted after it.
        raise EtlError(f"--output {config.output} lies inside the class-folder --input {config.input}; "
                       "choose an output folder outside it")
    publish.check_output(config.output, config.overwrite)
    refuse_unknown_beam_flags(beam_args)
    return CheckedRun(config, beam_args, class_names, folder_input)


def _exists(path: str) -> bool:
    """A file or folder; on an object store an object, or a prefix with objects under it."""
    if not is_remote(path):
        return os.path.exists(path)
    from apache_beam.io.filesystems import FileSystems

    under = glob.escape(path.rstrip("/")) + "/**"
    return FileSystems.exists(path) or bool(FileSystems.match([under], limits=[1])[0].metadata_list)


def is_folder_input(path: str) -> bool:
    """A folder of class sub-folders, rather than a CSV file."""
    if not is_remote(path):
        return os.path.isdir(path)
    from apache_beam.io.filesystems import FileSystems

    # Object stores have no folders: an existing object is the CSV, anything else a prefix.
    return path.endswith("/") or not FileSystems.exists(path)


def lies_under(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it, as written or (local paths) with their links resolved."""
    def nests(path: str, folder: str) -> bool:
        return (path.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")

    if is_remote(path) or is_remote(folder):
        return nests(path, folder)
    # Both: the listing follows links, so "images/out" (a link to /elsewhere) is listed, and an
    # --input reached through a link ("data" -> /mnt/d/data) holds its target's folders.
    return (nests(os.path.abspath(path), os.path.abspath(folder))
            or nests(os.path.realpath(path), os.path.realpath(folder)))


def read_text(path: str) -> str:
    """A whole (small) text file, local or on any Beam file system; BOM and CRLF tolerated. EtlError
    naming the file when it is a folder, unreadable or not UTF-8."""
    try:
        if is_remote(path):
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(path, compression_type="uncompressed") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, IOError) as e:
        raise EtlError(f"{path}: cannot read it: {type(e).__name__}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EtlError(f"{path} is not UTF-8 text (byte {data[e.start:e.start + 1]!r} at {e.start}); "
                       f"save it as UTF-8") from None


def read_class_names_file(path: str) -> list[str]:
    """One class name per line; blank lines ignored; a repeated name is an error."""
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    seen = set()
    for name in names:
        if name in seen:
            raise EtlError(f"{path}: class {name!r} is listed twice")
        seen.add(name)
    if not names:
        raise EtlError(f"{path}: no class names in the class names file")
    return names
