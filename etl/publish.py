"""The output folder's life cycle: refuse a non-empty one, stage, publish with the sidecar as the commit.

While a run works, everything it writes lives in `<output>/.incomplete-<run id>/`. Publishing
moves the new shards into `<output>/` under names that carry the run id (their generation), so
they never collide with the live dataset's; then `metadata.json` replaces the old sidecar in one
atomic step (a rename locally, one object write on GCS): the commit. Only then are the old
shards removed. So at every instant the folder holds one complete dataset, the old one until
the commit and the new one after it, each shard its sidecar lists in place with its size and
sha256. Files that no sidecar lists (a killed run's) are removed by the next run; a file the
live sidecar lists never is.

Beam's FileSystems (gs:// and the rest) load on first use: `check_output` reads a local folder
without them, so that `etl.preflight` refuses a non-empty one before Beam and TensorFlow load.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
import socket
import time
import uuid

from etl import stop_points
from etl.errors import EtlError
from shared import layout
from shared.paths import is_remote

TEMP_PREFIX = ".incomplete-"
_STAGING = re.compile(r"^\.incomplete-(?P<run_id>[0-9a-f]{12})(?P<suffix>\..*)?$")  # a suffix: being made or removed
OWNER_FILE = "owner.json"  # in each staging folder: the run writing it, so that another run can tell
# a killed run's left-overs (removed) from a live run's staging (refused, never deleted under it)
STALE_SECONDS = 24 * 3600  # a staging folder of another machine's run older than this is a left-over


class OutputNotEmptyError(EtlError):
    """--output cannot take this run's dataset: not empty without --overwrite, another run's, not a folder."""


class TooManyRejectsError(EtlError):
    """More inputs were rejected than --max_reject_fraction allows (or there were none): nothing is published."""


def beam_filesystems():
    """Beam's `FileSystems`, imported on first use (~1.2 s)."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _read_bytes(path: str) -> bytes:
    """A whole file; FileNotFoundError when a local one is missing. Beam loads for a remote path only."""
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    with beam_filesystems().open(path, compression_type="uncompressed") as f:
        return f.read()


def _exists(path: str) -> bool:
    return os.path.exists(path) if not is_remote(path) else beam_filesystems().exists(path)


def _list_entries(folder: str) -> list[str]:
    """Names directly inside `folder` (hidden ones included), [] if it does not exist."""
    if not is_remote(folder):
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    prefix = folder.rstrip("/") + "/"
    matches = beam_filesystems().match([prefix + "**"])[0].metadata_list
    # "": the folder's own placeholder (the Cloud Console's "Create folder" makes an empty "<folder>/").
    return sorted({m.path[len(prefix):].split("/", 1)[0] for m in matches} - {""})


def _delete(paths: list[str]) -> None:
    """Deletes files and folders; on object stores a "folder" is every object under its prefix."""
    local = [p for p in paths if not is_remote(p)]
    remote = []
    for p in paths:
        if is_remote(p):
            under = beam_filesystems().match([p.rstrip("/") + "/**"])[0].metadata_list
            remote.extend([m.path for m in under] or [p])
    if local or remote:
        beam_filesystems().delete(local + remote)


def _is_ours(name: str) -> bool:
    return (name in (layout.METADATA_FILE, layout.REJECTS_FILE) or name.startswith(TEMP_PREFIX)
            or layout.parse_shard_file_name(name) is not None)


def run_id_of(temp_dir: str) -> str | None:
    """The run id in a staging folder's name: the generation of the shards that run writes. None for
    a folder `prepare_output` did not make (a test building the pipeline into its own folder)."""
    m = _STAGING.match(temp_dir.rstrip("/").rsplit("/", 1)[-1])
    return m["run_id"] if m and not m["suffix"] else None


def _sync_folder(folder: str) -> None:
    """Makes renames and new names in a local folder durable (no-op on object stores)."""
    if not is_remote(folder):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def listed_shards(output: str) -> set[str] | None:
    """The shard files the live sidecar lists: an empty set without a sidecar, None when it is
    there but unreadable (then nothing can be shown to be unlisted)."""
    path = layout.join(output, layout.METADATA_FILE)
    try:
        body = json.loads(_read_bytes(path))
    except FileNotFoundError:
        return set()
    except Exception:
        if not _exists(path):
            return set()
        return None
    try:
        return {shard["file"] for split in body["splits"].values() for shard in split["shards"]}
    except (KeyError, TypeError, AttributeError):
        return None


def _live_staging(output: str, entries: list[str], ours: str | None = None) -> list[str]:
    return [e for e in entries if (m := _STAGING.match(e)) and not m["suffix"] and e != ours
            and _owner_is_running(layout.join(output, e))]


def _refuse_if_another_run_writes(output: str, entries: list[str], ours: str | None = None) -> None:
    running = _live_staging(output, entries, ours)
    if running:
        raise OutputNotEmptyError(
            f"another ETL run is writing to {output} (staging folder {running[0]}, "
            f"{_owner_text(layout.join(output, running[0]))}); wait for it to finish or stop it. "
            "--overwrite replaces a finished dataset, never one that is being written")


def _leftovers(output: str, entries: list[str]) -> list[str]:
    """Entries no live run and no live sidecar needs: staging folders of runs that are gone, and
    shard files the sidecar does not list (without a sidecar: those of a gone run's generation)."""
    staging = [e for e in entries if e.startswith(TEMP_PREFIX)]
    gone_generations = {m["run_id"] for e in staging if (m := _STAGING.match(e))}
    listed = listed_shards(output)
    has_sidecar = layout.METADATA_FILE in entries
    unlisted = []
    for e in entries:
        shard = layout.parse_shard_file_name(e)
        if shard is None or listed is None:
            continue
        if (has_sidecar and e not in listed) or (not has_sidecar and shard.generation in gone_generations):
            unlisted.append(e)
    return staging + unlisted


def check_output(output: str, overwrite: bool) -> tuple[list[str], list[str]]:
    """(left-overs that `prepare_output` removes, the entries of a previous ETL output that `publish`
    replaces), or OutputNotEmptyError. Reads only.

    Left-overs are killed runs' (`.incomplete-*`, shard files no sidecar lists) and a failed run's
    lone `rejects.jsonl`. Anything else needs --overwrite, which replaces only files the ETL writes:
    a folder holding other files is refused even then, so a wrong --output deletes nothing. A folder
    another live run writes to is refused, --overwrite or not.
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
    _refuse_if_another_run_writes(output, entries)
    leftovers = _leftovers(output, entries)
    rest = [e for e in entries if e not in leftovers]
    if rest == [layout.REJECTS_FILE]:  # a failed run's list of rejects, shown to the user
        leftovers, rest = leftovers + rest, []
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
    return leftovers, rest


def prepare_output(output: str, overwrite: bool) -> tuple[str, list[str]]:
    """Checks the output folder (`check_output`), makes a fresh staging folder inside it, then removes
    the left-overs; returns the staging folder and the entries of a previous ETL output that
    `publish` replaces. The previous output stays complete until the new sidecar replaces it: a run
    that fails (a mistyped --input, too many rejects) leaves it as it was.
    """
    leftovers, rest = check_output(output, overwrite)
    output = output.rstrip("/")
    temp_dir = _create_staging(output)
    stop_points.reached("create-staging")
    try:  # announced, then checked again: of two runs that start together, at most one goes on
        _refuse_if_another_run_writes(output, _list_entries(output), ours=temp_dir.rsplit("/", 1)[-1])
    except OutputNotEmptyError:
        discard(temp_dir)
        raise
    if leftovers:
        logging.info("Removing left-overs of an interrupted or failed run in %s: %s", output, leftovers)
        _delete([layout.join(output, e) for e in leftovers])
    return temp_dir, rest


def _create_staging(output: str) -> str:
    """A new staging folder that appears with its owner file in it, so that no other run ever
    sees it without one (and takes it for a left-over)."""
    temp_dir = layout.join(output, TEMP_PREFIX + uuid.uuid4().hex[:12])
    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    if is_remote(output):
        write_text(layout.join(temp_dir, OWNER_FILE), owner)  # the prefix exists from its first object on
        return temp_dir
    making = temp_dir + ".new"  # a left-over, never a live run, if this run dies before the rename
    os.makedirs(making)
    write_text(layout.join(making, OWNER_FILE), owner)
    os.rename(making, temp_dir)
    return temp_dir


def _owner_text(staging: str) -> str:
    try:
        owner = json.loads(_read_bytes(layout.join(staging, OWNER_FILE)))
        return f"process {owner['pid']} on {owner['host']}"
    except Exception:
        return "owner unknown"


def _owner_is_running(staging: str) -> bool:
    """Whether the run that made `staging` may still be writing: its process is alive on this
    machine, or it ran on another machine and its owner file is under STALE_SECONDS old. A folder
    without an owner file is a left-over (`_create_staging` never shows one without it)."""
    path = layout.join(staging, OWNER_FILE)
    try:
        owner = json.loads(_read_bytes(path))
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
        age = time.time() - beam_filesystems().match([path])[0].metadata_list[0].last_updated_in_seconds
    except Exception:
        return True
    return age < STALE_SECONDS


def _read_lines(pattern: str) -> list[str]:
    filesystems = beam_filesystems()
    found = filesystems.match([pattern])[0].metadata_list
    lines = []
    for m in sorted(found, key=lambda m: m.path):
        with filesystems.open(m.path, compression_type="uncompressed") as f:
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
    with beam_filesystems().create(path, mime_type="text/plain", compression_type="uncompressed") as f:
        f.write(text.encode("utf-8"))


def _replace_file(output: str, name: str, text: str, temp_dir: str) -> None:
    """`<output>/<name>` becomes `text` in one step: readers see the old file or the new, never a
    part (a local file is written in the staging folder, fsync'ed and renamed over the old one;
    a GCS object appears whole when its upload finishes)."""
    target = layout.join(output, name)
    if is_remote(output):
        write_text(target, text)
        return
    staged = layout.join(temp_dir, name)
    with open(staged, "wb") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    stop_points.reached(f"stage-{name}")
    os.replace(staged, target)
    _sync_folder(output)


def write_rejects(output: str, rejects: list[dict], temp_dir: str) -> None:
    lines = sorted(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rejects)
    _replace_file(output, layout.REJECTS_FILE, "".join(line + "\n" for line in lines), temp_dir)


def publish(output: str, temp_dir: str, shards: list[dict], metadata_json: str, rejects: list[dict]) -> None:
    """Moves the staged shards (`staged` -> `file` of each) into `output` beside the live dataset,
    commits the new sidecar, writes rejects.jsonl, then removes what the new sidecar does not list
    (the replaced dataset's shards) and the staging folder."""
    output = output.rstrip("/")
    for shard in shards:
        beam_filesystems().rename([shard["staged"]], [layout.join(output, shard["file"])])
        stop_points.reached("move-shard")
    _sync_folder(output)
    _replace_file(output, layout.METADATA_FILE, metadata_json, temp_dir)
    stop_points.reached("commit-sidecar")
    write_rejects(output, rejects, temp_dir)
    stop_points.reached("write-rejects")
    try:
        remove_unlisted_shards(output)
    except Exception as e:  # the new dataset is complete; the next run removes what is left
        logging.warning("could not remove the replaced shards in %s: %s", output, e)
    discard(temp_dir)


def remove_unlisted_shards(output: str, generation: str | None = None) -> list[str]:
    """Deletes the shard files in `output` that the live sidecar (read from the folder now) does not
    list, only those of `generation` when given, one at a time; returns their names."""
    listed = listed_shards(output)
    if listed is None:
        return []
    removed = []
    for name in _list_entries(output):
        shard = layout.parse_shard_file_name(name)
        if shard is None or name in listed or (generation is not None and shard.generation != generation):
            continue
        _delete([layout.join(output, name)])
        removed.append(name)
        stop_points.reached("delete-unlisted")
    return removed


def discard(temp_dir: str) -> None:
    """Removes a run's staging folder, and the shards it moved into the output that no sidecar lists
    (a failure between moving them and the commit)."""
    stop_points.reached("discard-staging")
    output = temp_dir.rstrip("/").rsplit("/", 1)[0]
    try:
        if run_id_of(temp_dir):
            remove_unlisted_shards(output, run_id_of(temp_dir))
        if is_remote(temp_dir):  # its owner file last: until then it is this run's, not a left-over
            filesystems = beam_filesystems()
            owner = layout.join(temp_dir, OWNER_FILE)
            others = [m.path for m in filesystems.match([temp_dir.rstrip("/") + "/**"])[0].metadata_list
                      if m.path != owner]
            if others:
                filesystems.delete(others)
            if filesystems.exists(owner):
                filesystems.delete([owner])
        elif os.path.isdir(temp_dir):
            removing = temp_dir.rstrip("/") + ".removing"  # a left-over from here on, whatever is left of it
            os.rename(temp_dir, removing)
            _delete([removing])
    except Exception as e:  # a left-over staging folder is harmless: the next run removes it
        logging.warning("could not remove %s: %s", temp_dir, e)
