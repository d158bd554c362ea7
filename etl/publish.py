"""The output folder's life cycle: refuse a non-empty one, stage, and publish with the sidecar last.

While a run works, everything it writes lives in `<output>/.incomplete-<run id>/`. Only when
the pipeline has finished and the reject fraction is acceptable are the shards moved into
`<output>/`, then `rejects.jsonl`, then `metadata.json`. A killed run leaves only the
`.incomplete-*` folder, which the next run removes; no reader takes it for a dataset.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import time
import uuid
from typing import Sequence

from apache_beam.io.filesystems import FileSystems

from shared import layout
from shared.paths import is_remote

TEMP_PREFIX = ".incomplete-"


class OutputNotEmptyError(RuntimeError):
    pass


class TooManyRejectsError(RuntimeError):
    pass


def _list_entries(folder: str) -> list[str]:
    """Names directly inside `folder` (hidden ones included), [] if it does not exist."""
    if not is_remote(folder):
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    prefix = folder.rstrip("/") + "/"
    matches = FileSystems.match([prefix + "**"])[0].metadata_list
    # "": the folder's own placeholder (the Cloud Console's "Create folder" makes an empty "<folder>/").
    return sorted({m.path[len(prefix):].split("/", 1)[0] for m in matches} - {""})


def _delete(paths: list[str]) -> None:
    """Deletes files and folders; on object stores a "folder" is every object under its prefix."""
    local = [p for p in paths if not is_remote(p)]
    remote = []
    for p in paths:
        if is_remote(p):
            under = FileSystems.match([p.rstrip("/") + "/**"])[0].metadata_list
            remote.extend([m.path for m in under] or [p])
    if local or remote:
        FileSystems.delete(local + remote)


def _is_ours(name: str) -> bool:
    return (name in (layout.METADATA_FILE, layout.REJECTS_FILE) or name.startswith(TEMP_PREFIX)
            or layout.parse_shard_file_name(name) is not None)


def prepare_output(output: str, overwrite: bool) -> tuple[str, list[str]]:
    """Checks the output folder; returns a fresh staging folder inside it and the entries of a
    previous ETL output that `publish` replaces.

    Left-overs of killed runs (`.incomplete-*`) and a failed run's lone `rejects.jsonl` are
    removed. Anything else needs --overwrite, which replaces only files the ETL writes: a
    folder holding other files is refused even then, so a wrong --output deletes nothing. The
    previous output stays complete until the new one is ready to publish: a run that fails
    (a mistyped --input, too many rejects) leaves it as it was.
    """
    if output.rstrip("/") == "":
        raise OutputNotEmptyError(f"--output {output!r} is the file system's root; give a folder for the dataset")
    output = output.rstrip("/")
    if set(output) & set("*?["):
        # Beam's WriteToText finds its own temporary files by a pattern made from this path; with
        # "out[1]" it found none and the run failed at the end with a BeamIOError.
        raise OutputNotEmptyError(f"--output {output} has a glob character (* ? [), which Beam's file writing "
                                  "reads as a pattern; choose a folder name without them")
    if not is_remote(output) and os.path.exists(output) and not os.path.isdir(output):
        raise OutputNotEmptyError(f"--output {output} is a file; give a folder (it is created if missing)")
    entries = _list_entries(output)
    leftovers = [e for e in entries if e.startswith(TEMP_PREFIX)]
    running = [e for e in leftovers if _owner_is_running(layout.join(output, e))]
    if running and not overwrite:
        raise OutputNotEmptyError(
            f"another ETL run is writing to {output} (staging folder {running[0]}, "
            f"{_owner_text(layout.join(output, running[0]))}); wait for it, or pass --overwrite to replace it")
    if entries == [layout.REJECTS_FILE] or (set(entries) - set(leftovers)) == {layout.REJECTS_FILE}:
        leftovers.append(layout.REJECTS_FILE)
    if leftovers:
        logging.info("Removing left-overs of an interrupted or failed run in %s: %s", output, leftovers)
        _delete([layout.join(output, e) for e in leftovers])
    rest = [e for e in entries if e not in leftovers]
    if rest:
        foreign = [e for e in rest if not _is_ours(e)]
        if not overwrite:
            raise OutputNotEmptyError(
                f"--output {output} is not empty ({len(rest)} entries, e.g. {rest[:3]}); "
                "pass --overwrite to replace a previous ETL output, or choose another folder")
        if foreign:
            raise OutputNotEmptyError(
                f"--output {output} holds files the ETL did not write ({foreign[:5]}); --overwrite only "
                "replaces ETL outputs, so remove them or choose another folder")
    temp_dir = layout.join(output, TEMP_PREFIX + uuid.uuid4().hex[:12])
    FileSystems.mkdirs(temp_dir)
    write_text(layout.join(temp_dir, OWNER_FILE), json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return temp_dir, rest


OWNER_FILE = "owner.json"  # in each staging folder: the run writing it, so that another run can tell
# a killed run's left-overs (removed) from a live run's staging (refused, not deleted under it)
STALE_SECONDS = 24 * 3600  # a staging folder of another machine's run older than this is a left-over


def _owner_text(staging: str) -> str:
    try:
        with FileSystems.open(layout.join(staging, OWNER_FILE), compression_type="uncompressed") as f:
            owner = json.loads(f.read())
        return f"process {owner['pid']} on {owner['host']}"
    except Exception:
        return "owner unknown"


def _owner_is_running(staging: str) -> bool:
    """Whether the run that made `staging` may still be writing: its process is alive on this
    machine, or it ran on another machine and its owner file is under STALE_SECONDS old. A folder
    without an owner file (a run killed before writing it) is a left-over."""
    path = layout.join(staging, OWNER_FILE)
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            owner = json.loads(f.read())
        host, pid = owner["host"], int(owner["pid"])
    except Exception:
        return False
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # it exists, as another user
        return pid != os.getpid()
    try:
        age = time.time() - FileSystems.match([path])[0].metadata_list[0].last_updated_in_seconds
    except Exception:
        return True
    return age < STALE_SECONDS


def _read_lines(pattern: str) -> list[str]:
    found = FileSystems.match([pattern])[0].metadata_list
    lines = []
    for m in sorted(found, key=lambda m: m.path):
        with FileSystems.open(m.path, compression_type="uncompressed") as f:
            # WriteToText ends lines with "\n" only; str.splitlines also splits at U+0085 and U+2028,
            # which json.dumps(ensure_ascii=False) leaves in a file name (a NEL in a rejected file's name
            # cut its JSON line in two and failed the whole run).
            lines.extend(line for line in f.read().decode("utf-8").split("\n") if line.strip())
    return lines


def read_staged_results(temp_dir: str) -> dict:
    """What the pipeline left in the staging folder: shard stats, rejects, the row count, class names."""
    shards = [json.loads(line) for line in _read_lines(layout.join(temp_dir, "shards-*"))]
    rejects = [json.loads(line) for line in _read_lines(layout.join(temp_dir, "rejects-*"))]
    rows = sum(int(line) for line in _read_lines(layout.join(temp_dir, "num_rows-*")))
    class_lines = _read_lines(layout.join(temp_dir, "class_names-*"))
    class_names = json.loads(class_lines[0]) if class_lines else None
    return {"shards": shards, "rejects": rejects, "num_rows": rows, "class_names": class_names}


def check_accounting(staged: dict, max_reject_fraction: float, input_path: str) -> dict:
    """records + rejects = rows, and the reject fraction is acceptable. Returns the rejects summary."""
    num_records = sum(s["num_examples"] for s in staged["shards"])
    rejects = staged["rejects"]
    by_reason = dict(sorted(collections.Counter(r["reason"] for r in rejects).items()))
    rows = staged["num_rows"]
    if num_records + len(rejects) != rows:
        raise RuntimeError(f"accounting error: {num_records} records + {len(rejects)} rejects != {rows} input rows; "
                           "this is a bug in the ETL, please report it")
    if rows == 0:
        raise TooManyRejectsError(f"{input_path} has no input rows (blank lines and a header do not count)")
    fraction = len(rejects) / rows
    if fraction > max_reject_fraction:
        examples = "; ".join(f"{r['uri'] or r['source']!r}: {r['reason']} ({r['detail']})" for r in rejects[:3])
        raise TooManyRejectsError(
            f"{len(rejects)} of {rows} inputs ({fraction:.1%}) were rejected, above --max_reject_fraction "
            f"{max_reject_fraction}: nothing was published. By reason: {by_reason}. For example: {examples}")
    return {"count": len(rejects), "by_reason": by_reason, "fraction": round(fraction, 6)}


def write_text(path: str, text: str) -> None:
    with FileSystems.create(path, mime_type="text/plain", compression_type="uncompressed") as f:
        f.write(text.encode("utf-8"))


def write_rejects(output: str, rejects: list[dict]) -> None:
    lines = sorted(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rejects)
    write_text(layout.join(output, layout.REJECTS_FILE), "".join(line + "\n" for line in lines))


def publish(output: str, temp_dir: str, shard_names: list[str], metadata_json: str, rejects: list[dict],
            replaced: Sequence[str] = ()) -> None:
    """Removes the previous output's `replaced` entries (its sidecar first, so that no reader takes
    the folder for a complete dataset from then on), moves the staged shards into place, then
    writes rejects.jsonl, then metadata.json, then cleans up."""
    if layout.METADATA_FILE in replaced:
        _delete([layout.join(output, layout.METADATA_FILE)])
    _delete([layout.join(output, e) for e in replaced if e != layout.METADATA_FILE])
    staged = layout.join(temp_dir, "shards")
    if shard_names:
        FileSystems.rename([layout.join(staged, n) for n in shard_names], [layout.join(output, n) for n in shard_names])
    write_rejects(output, rejects)
    write_text(layout.join(output, layout.METADATA_FILE), metadata_json)
    discard(temp_dir)


def discard(temp_dir: str) -> None:
    try:
        _delete([temp_dir])
    except Exception as e:  # a left-over staging folder is harmless: the next run removes it
        logging.warning("could not remove %s: %s", temp_dir, e)
