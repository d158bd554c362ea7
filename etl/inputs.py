"""Labelled inputs: CSV rows or class folders -> (uri, label) rows, malformed rows -> rejects.

Paths go through Beam's FileSystems, so local paths and gs:// work alike; only a local class
folder is listed with os.scandir, which follows symlinked folders where Beam's match does not.
"""
from __future__ import annotations

import csv
import errno
import glob
import io
import os
import posixpath
import typing
from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from etl import progress
from etl.errors import EtlError
from shared.paths import is_remote

# A first line whose fields look like these is a header, not an image.
_HEADER_PATH_NAMES = {"path", "uri", "url", "image", "image_path", "image_uri", "filename", "file", "gcs_path", "img"}
_HEADER_LABEL_NAMES = {"label", "class", "category", "class_name", "label_name", "target"}


class Row(typing.NamedTuple):
    uri: str
    label: str
    source: str  # the input line, for reject messages
    # The uri relative to the input's root (the CSV's folder, or the class-folder root) when it lies
    # under it: the split and the example id hash this, so a dataset moved to another disk or to
    # gs:// keeps every image in its split (hashing the absolute path moved 619 of the sample's
    # 1,797 images, and put 154 of its 190 test images in train).
    key: str = ""


def split_key(uri: str, root: str) -> str:
    """`uri` relative to `root` if it lies under it, else `uri` itself."""
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def make_reject(uri: str, label: str, reason: str, detail: str, source: str = "") -> dict:
    """The one shape of a line of rejects.jsonl."""
    return {"uri": uri, "label": label, "reason": reason, "detail": detail, "source": source}


def rejected(reject: dict) -> beam.pvalue.TaggedOutput:
    """`reject` for a step's "rejects" output, counted (progress.REJECTED and its reason)."""
    progress.count_reject(reject["reason"])
    return beam.pvalue.TaggedOutput("rejects", reject)


def _parse_fields(line: str) -> list[str] | None:
    try:
        return next(csv.reader(io.StringIO(line), skipinitialspace=True), [])
    except csv.Error:
        return None


def detect_header(csv_path: str) -> list[str] | None:
    """The first non-blank line's fields if it is a header row (`path,label`, `image,class`, `filepath,species`).

    A header names its columns: a known path or label column name, or a first field with no file
    extension. Never a row whose first field is a file that exists: `x.jpg,category` is an image
    of the class "category", not a header; a folder is no file (`images,label` beside `images/`).
    Read decompressed (`rows.csv.gz`), as Beam reads it."""
    first = ""
    with FileSystems.open(csv_path) as f:  # AUTO: decompressed by extension, like ReadFromText
        # Blank lines are no rows: a header after one became a row and a class "label". A BOM is
        # dropped from any line, as parse_csv_line drops it.
        for line in iter(f.readline, b""):
            first = line.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
            if first:
                break
    fields = _parse_fields(first)
    if not fields or len(fields) < 2:
        return None
    path, label = fields[0].strip(), fields[-1].strip()
    named = path.lower() in _HEADER_PATH_NAMES or label.lower() in _HEADER_LABEL_NAMES
    if not (named or not posixpath.splitext(path)[1]):
        return None
    csv_dir = os.path.dirname(os.path.abspath(csv_path)) if not is_remote(csv_path) else csv_path.rsplit("/", 1)[0]
    try:
        if path and _is_file(resolve_path(path, csv_dir)):
            return None
    except Exception:  # an unreachable store: only column names make a header
        return [x.strip() for x in fields] if named else None
    return [x.strip() for x in fields]


def _is_file(path: str) -> bool:
    """An existing entry that is not a folder: `images,label` beside an `images/` folder is a header."""
    if not is_remote(path):
        return os.path.exists(path) and not os.path.isdir(path)
    return FileSystems.exists(path)  # an object: object stores have no folders


def resolve_path(path: str, csv_dir: str) -> str:
    """A relative path in a CSV is relative to the CSV's folder, with "." and ".." resolved on every
    file system; URIs and absolute paths stay."""
    if is_remote(path) or path.startswith("/"):
        return path
    if is_remote(csv_dir):
        # An object store takes "." and ".." as parts of a name ("gs://b/l/./x.jpg" is no object).
        # Only those go: "a//b" may name an object, where normpath would make it "a/b".
        scheme, _, rest = csv_dir.partition("://")
        bucket, _, folder = rest.rstrip("/").partition("/")
        parts = folder.split("/") if folder else []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part != ".":
                parts.append(part)
        return f"{scheme}://{bucket}/" + "/".join(parts)
    return posixpath.normpath(posixpath.join(csv_dir, path))


def parse_csv_line(raw: bytes | str, csv_dir: str, header: list[str] | None, key_root: str | None = None,
                   exact_paths: bool = False):
    """One CSV line (bytes, as read) -> a Row, a reject dict, or nothing (blank line, header).
    A line that is not UTF-8 is a malformed_row reject, not the end of the job. Spaces around a
    path are dropped unless `exact_paths` (the driver's CSV of a folder input, whose paths are
    file names as listed: "cat/1.jpg " became a missing_file reject for "cat/1.jpg")."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            shown = raw.decode("utf-8", errors="replace")
            if exact_paths and key_root:  # the driver's line: name the file under the root, as other rejects do
                fields = _parse_fields(shown.rstrip("\r\n"))
                shown = split_key(fields[0], key_root) if fields else shown
            progress.count(progress.ROWS)
            yield rejected(make_reject(
                "", "", "malformed_row", f"the line is not UTF-8 (byte {raw[e.start:e.start + 1]!r} at {e.start}); "
                                         f"save the CSV as UTF-8 (in a class folder: rename the file)", shown))
            return
    line = raw.lstrip("\ufeff").rstrip("\r\n")
    if not line.strip():
        return
    fields = _parse_fields(line)
    if fields is not None and header is not None and [x.strip() for x in fields] == header:
        return
    progress.count(progress.ROWS)
    if fields is None or len(fields) != 2:
        count = "unparseable" if fields is None else f"{len(fields)} fields"
        yield rejected(make_reject(
            "", "", "malformed_row", f"expected 2 fields (path,label), got {count}; quote a path that has a comma",
            line))
        return
    path, label = (fields[0] if exact_paths else fields[0].strip()), fields[1].strip()
    if not path or not label:
        yield rejected(make_reject(
            path, label, "malformed_row", "empty path or label", line))
        return
    uri = resolve_path(path, csv_dir)
    yield Row(uri, label, line, split_key(uri, key_root or csv_dir))


def list_class_folders(root: str) -> list[Row]:
    """Rows for `root/<class>/<file>`, and for files in folders inside a class folder (`cat/2019/x.jpg`
    is a cat, as Keras's image_dataset_from_directory reads it); files beside the class folders
    (README, dict.txt) and hidden files and folders (.DS_Store) are not inputs."""
    root = root.rstrip("/")
    if not is_remote(root):
        root = os.path.abspath(root)  # rows are read later, relative to another folder
        paths = _list_local_class_files(root)
    else:
        matches = FileSystems.match([glob.escape(root) + "/*/**"])[0].metadata_list  # a root named "g[1]" is no pattern
        paths = [m.path for m in matches]
    rows = []
    for path in paths:
        relative = path[len(root) + 1:]
        parts = relative.split("/")
        # An empty last part is an object store's folder placeholder ("cat/"), not a file.
        if len(parts) < 2 or any(part.startswith(".") or not part for part in parts):
            continue
        rows.append(Row(path, parts[0], relative))
    rows.sort()
    if not rows:
        raise EtlError(f"{root} has no class sub-folders with files in them (expected {root}/<class>/<image>)")
    return rows


def _list_local_class_files(root: str) -> list[str]:
    """Paths of every entry that is not a folder under `root/<class>/`, at any depth, following
    symlinked folders (a link back to a folder being listed is not followed again). Beam's match
    walks with os.walk, which does not enter symlinked folders (a class linked in from another disk
    vanished, no reject), drops broken symlinks (not missing_file rejects) and skips folders it
    cannot read."""
    paths = []

    def is_folder(entry: os.DirEntry) -> bool:  # follows a symlink
        try:
            return entry.is_dir()
        except OSError as e:
            if e.errno != errno.ELOOP:  # a folder it cannot read ends the run, as below
                raise
            return False  # a link in a loop ("x.jpg -> x.jpg"): broken, as a dangling link is

    def walk(folder: str, ancestors: frozenset) -> None:
        real = os.path.realpath(folder)
        if real in ancestors:
            return
        for entry in os.scandir(folder):
            if entry.name.startswith("."):
                continue
            if is_folder(entry):
                walk(entry.path, ancestors | {real})
            else:
                paths.append(entry.path)

    try:
        for class_dir in os.scandir(root):
            if not class_dir.name.startswith(".") and is_folder(class_dir):
                walk(class_dir.path, frozenset({os.path.realpath(root)}))
    except OSError as e:
        raise EtlError(f"{e.filename}: cannot list it: {e.strerror}") from None
    return paths


def keep_one_of_duplicates(item, known_labels: frozenset[str] | None = None):
    """(uri, rows) -> one row for the uri, the others rejected.

    Rows whose label the labels file has win over rows whose label it lacks (those would be
    rejected anyway, and must not cost the valid one). Among the rest, one label: one row is
    kept (the same one on any runner: the smallest line text, since Beam keeps no line numbers)
    and the others are `duplicate`; two or more labels: every row is `conflicting_labels`, since
    nothing says which is right."""
    uri, rows = item
    rows = sorted(rows, key=lambda r: (r.source, r.label))
    candidates = [r for r in rows if known_labels is None or r.label in known_labels] or rows
    labels = sorted({r.label for r in candidates})
    if len(labels) > 1:
        for row in rows:
            yield rejected(make_reject(
                row.uri, row.label, "conflicting_labels",
                f"the same uri has labels {labels} in {len(rows)} rows; an image with two labels is left out",
                row.source))
        return
    kept = candidates[0]
    yield kept
    for extra in rows:
        if extra is not kept:
            yield rejected(make_reject(
                extra.uri, extra.label, "duplicate",
                f"the same uri is already an input with label {kept.label!r}", extra.source))


@beam.ptransform_fn
def ReadLabelledRows(pbegin, input_path: str, rows_csv: str | None = None, class_names: Sequence[str] | None = None):
    """PBegin -> {'rows': Row, 'rejects': dict, 'num_rows': int}. `rows_csv` (a CSV the driver wrote for a folder
    input) is read instead of `input_path` when given; `class_names` (the labels file) settles duplicates."""
    csv_path = rows_csv or input_path
    # The driver's CSV of a folder input has no header; guessing could take a first file that no
    # longer exists (a dangling link "cat/0") for one, and drop it without a reject.
    header = None if rows_csv else detect_header(csv_path)
    csv_dir = os.path.dirname(os.path.abspath(csv_path)) if not is_remote(csv_path) else csv_path.rsplit("/", 1)[0]
    # Split keys are relative to the class-folder root for a folder input (its rows CSV sits elsewhere).
    key_root = (os.path.abspath(input_path) if not is_remote(input_path) else input_path).rstrip("/") if rows_csv else csv_dir
    parsed = (pbegin
              # ReadFromText takes a pattern: "flowers [v2]/all.csv" matched no file and failed the run.
              | "ReadCsvLines" >> beam.io.ReadFromText(glob.escape(csv_path), strip_trailing_newlines=True,
                                                       coder=beam.coders.BytesCoder())
              | "ParseCsvLines" >> beam.FlatMap(parse_csv_line, csv_dir, header, key_root, exact_paths=bool(rows_csv))
              .with_outputs("rejects", main="rows"))
    rows = parsed.rows
    if rows_csv:  # the driver's own CSV line is no input line: a reject's source is the file under the root
        rows = rows | "SourceIsPathUnderRoot" >> beam.Map(lambda r: r._replace(source=r.key))
    deduplicated = (rows
                    | "KeyByUri" >> beam.Map(lambda r: (r.uri, r))
                    | "GroupByUri" >> beam.GroupByKey()
                    | "DropDuplicateUris" >> beam.FlatMap(keep_one_of_duplicates,
                                                          frozenset(class_names) if class_names else None)
                    .with_outputs("rejects", main="rows"))
    rejects = (parsed.rejects, deduplicated.rejects) | "MergeRowRejects" >> beam.Flatten()
    num_rows = ((parsed.rows, parsed.rejects)
                | "AllParsedRows" >> beam.Flatten()
                | "CountRows" >> beam.combiners.Count.Globally())
    return {"rows": deduplicated.rows, "rejects": rejects, "num_rows": num_rows}


def write_rows_csv(rows: list[Row], path: str) -> None:
    """Writes folder-input rows as a CSV (quoted as needed) for the pipeline to read."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for r in rows:
        writer.writerow([r.uri, r.label])
    with FileSystems.create(path, mime_type="text/csv", compression_type="uncompressed") as f:
        # A file name that is not UTF-8 (b"caf\xe9.jpg", read as "caf\udce9.jpg") keeps its bytes, so that
        # its line is one malformed_row reject; encoding it strictly failed the whole run, naming no file.
        f.write(out.getvalue().encode("utf-8", errors="surrogateescape"))
