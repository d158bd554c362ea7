"""A TF Serving predict request body -> checked image bytes, refusing anything hostile with a 4xx.

Instance forms (TF Serving's row format for a signature whose one input is `image_bytes`):
  {"image_bytes": {"b64": "..."}}   or the bare   {"b64": "..."}
  {"filenames": "cats/1.jpg"}       only with an allowed root, read by this code, never by the graph

Status codes: 413 when a limit is broken (body, instances, pixels, bytes), 403 for a path outside
the root or filenames while they are disabled, 400 for anything malformed. Messages name the
instance by index and never echo file contents or where a symlink points.
"""
from __future__ import annotations

import binascii
import dataclasses
import os
import re
import sys
from typing import Any

# C extensions: on a 32-image request they parse ~10x faster than the stdlib's base64 and json.
import orjson
import pybase64

from shared import image_check
from shared.untrusted_files import FileRefused, read_untrusted_file
from trainer.serving.contract import SERVING_SIGNATURE
from trainer.serving.exported_model import prepare_image_bytes

# A scheme and a slash (gs://, http://, file:/etc): such strings are refused by name, never paths
# here. A colon alone is an ordinary file name character ("shot:1.png").
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_WEB_SAFE_TO_STANDARD = str.maketrans("-_", "+/")


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    max_body_bytes: int = 10 * 2**20  # 10 MiB: 64 phone-camera JPEGs of ~110 KB in base64, or one 7 MB photo
    max_instances: int = 64
    max_pixels: int = image_check.DEFAULT_MAX_PIXELS  # per image, from its header: the ETL's 40 MP
    # All images of one request: TF decodes each to uint8 (3 bytes a pixel) and copies it to float32
    # only if it is smaller than the model's input (shared.preprocess.resize_image), so 100 MP bounds
    # one request's decode memory near 300 MB even if every image were in flight.
    max_request_pixels: int = 100_000_000
    allow_root: str | None = None  # real path of the folder `filenames` may read; None = filenames refused

    def __post_init__(self):
        for name in ("max_body_bytes", "max_instances", "max_pixels", "max_request_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.allow_root is not None:
            if not os.path.isdir(self.allow_root):
                raise ValueError(f"allow_root {self.allow_root!r} is not a folder")
            object.__setattr__(self, "allow_root", os.path.realpath(self.allow_root))


class RequestRejected(Exception):
    """A request the server refuses; `status` is the HTTP status, the message is the JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_predict_request(body: bytes, limits: ServingLimits) -> list[tuple[bytes, image_check.ImageHeader]]:
    """The request body -> (image bytes, header) per instance, in order, every limit checked.

    Only headers are read, so a request over the pixel budget costs header reads only; nothing
    is decoded. `to_model_inputs` then converts what TF cannot read, which does decode.
    """
    instances = _read_instances(body, limits)
    checked = []
    total_bytes = 0
    total_pixels = 0
    for index, instance in enumerate(instances):
        data = _instance_bytes(index, instance, limits)
        total_bytes += len(data)
        if total_bytes > limits.max_body_bytes:
            raise RequestRejected(413, f"instances 0..{index} hold {total_bytes:,} bytes of images, over the "
                                       f"limit of {limits.max_body_bytes:,} (--max_body_mb)")
        try:
            header = image_check.read_header(data, limits.max_pixels)
        except image_check.ImageRejected as e:
            status = 413 if e.reason == "too_large" else 400
            hint = " (--max_pixels)" if e.reason == "too_large" else ""
            raise RequestRejected(status, f"instance {index}: {e.detail}{hint}") from None
        total_pixels += header.width * header.height
        if total_pixels > limits.max_request_pixels:
            raise RequestRejected(413, f"instances 0..{index} hold {total_pixels:,} pixels, over the per-request "
                                       f"limit of {limits.max_request_pixels:,}; send fewer or smaller images")
        checked.append((data, header))
    return checked


def to_model_inputs(checked: list[tuple[bytes, image_check.ImageHeader]]) -> list[bytes]:
    """Checked images -> bytes the serving signature decodes: JPEG, PNG, still WebP and plain BMP as
    sent, anything else decoded and re-encoded as PNG (`prepare_image_bytes`). That decode holds the whole
    image in memory, so the server runs this in a model slot, as it runs the model's own decode.
    No full decode with PIL first: TF refuses the same corrupt files, and the model then names the
    image (`BatchDecodeError`)."""
    prepared = []
    for index, (data, header) in enumerate(checked):
        try:
            prepared.append(prepare_image_bytes(data, header, verify=False))
        except image_check.ImageRejected as e:
            raise RequestRejected(400, f"instance {index}: {e.detail}") from None
    return prepared


def _read_instances(body: bytes, limits: ServingLimits) -> list[Any]:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as e:  # also invalid UTF-8 and nesting deeper than 1024
        raise RequestRejected(400, f"the body is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(request, dict):
        raise RequestRejected(400, f'the body must be a JSON object {{"instances": [...]}}, got {_json_kind(request)}')
    signature = request.get("signature_name", "")
    if signature not in ("", SERVING_SIGNATURE):  # "" is the default, as in TF Serving
        raise RequestRejected(400, f"signature_name {str(signature)[:100]!r} is not served; only {SERVING_SIGNATURE!r} is "
                                   f"(paths are sent as {{\"filenames\": ...}} instances, which this server reads itself)")
    if "instances" not in request:
        keys = sorted(request)[:10]
        raise RequestRejected(400, f'the body must have "instances" (row format); it has {keys}')
    instances = request["instances"]
    if not isinstance(instances, list) or not instances:
        shown = "an empty array" if isinstance(instances, list) else _json_kind(instances)
        raise RequestRejected(400, f'"instances" must be a non-empty array, got {shown}')
    if len(instances) > limits.max_instances:
        raise RequestRejected(413, f"{len(instances)} instances is over the limit of {limits.max_instances} "
                                   f"per request (--max_instances); split the request")
    return instances


def _instance_bytes(index: int, instance: Any, limits: ServingLimits) -> bytes:
    if isinstance(instance, dict) and set(instance) == {"b64"}:
        return _decode_b64(index, instance["b64"])
    if isinstance(instance, dict) and set(instance) == {"image_bytes"}:
        value = instance["image_bytes"]
        if isinstance(value, dict) and set(value) == {"b64"}:
            return _decode_b64(index, value["b64"])
        shown = f"an object with keys {sorted(value)[:5]}" if isinstance(value, dict) else _json_kind(value)
        raise RequestRejected(400, f'instance {index}: "image_bytes" must be {{"b64": "<base64>"}} (binary data '
                                   f"cannot travel as a JSON string), got {shown}")
    if isinstance(instance, dict) and set(instance) == {"filenames"}:
        return read_file_under_root(index, instance["filenames"], limits)
    shown = f"an object with keys {sorted(instance)[:5]}" if isinstance(instance, dict) else _json_kind(instance)
    raise RequestRejected(400, f'instance {index}: expected {{"image_bytes": {{"b64": ...}}}}, {{"b64": ...}} or '
                               f'{{"filenames": ...}}, got {shown}')


def _decode_b64(index: int, text: Any) -> bytes:
    if not isinstance(text, str):
        raise RequestRejected(400, f'instance {index}: "b64" must be a string, got {_json_kind(text)}')
    try:
        # Standard or web-safe alphabet (TF Serving takes both); anything else is an error, not skipped.
        if "-" in text or "_" in text:
            text = text.translate(_WEB_SAFE_TO_STANDARD)
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestRejected(400, f"instance {index}: invalid base64 ({len(text)} characters): {e}") from None


def read_file_under_root(index: int, name: Any, limits: ServingLimits) -> bytes:
    """Reads a client-named file only if its real path (symlinks resolved) lies under the allowed root.

    Relative names are relative to the root. The file is opened without following a final symlink
    and its open descriptor is checked again (Linux: /proc/self/fd), so a symlink swapped in after
    the check is still refused. Only regular files are read (a FIFO or /dev/zero would never end).
    """
    root = limits.allow_root
    if root is None:
        raise RequestRejected(403, f'instance {index}: "filenames" instances are disabled; '
                                   f"start the server with --allow_root DIR to read files under DIR")
    if not isinstance(name, str) or not name or "\x00" in name:
        shown = (_json_kind(name) if not isinstance(name, str) else
                 "an empty string" if not name else "a string with a NUL character")
        raise RequestRejected(400, f'instance {index}: "filenames" must be one non-empty path string, got {shown}')
    if _URL_SCHEME.match(name):
        raise RequestRejected(403, f"instance {index}: {name[:200]!r} is a URL; only paths under the allowed root are read")
    real = os.path.realpath(os.path.join(root, name))
    if not _is_under(real, root):
        raise RequestRejected(403, f"instance {index}: {name[:200]!r} is outside the allowed root")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as e:
        raise RequestRejected(400, f"instance {index}: cannot open {name[:200]!r} under the allowed root: "
                                   f"{e.strerror}") from None
    try:
        if sys.platform.startswith("linux") and not _is_under(os.readlink(f"/proc/self/fd/{fd}"), root):
            raise RequestRejected(403, f"instance {index}: {name[:200]!r} is outside the allowed root")
        info = os.fstat(fd)
        try:
            return read_untrusted_file(lambda: os.fdopen(os.dup(fd), "rb"), limits.max_body_bytes,
                                       mode=info.st_mode, size=info.st_size)
        except FileRefused as e:
            if e.reason == "not_regular":
                raise RequestRejected(400, f"instance {index}: {name[:200]!r} is {e.detail}") from None
            raise RequestRejected(413, f"instance {index}: {name[:200]!r}: {e.detail} (--max_body_mb)") from None
    finally:
        os.close(fd)


def _json_kind(value: Any) -> str:
    """A parsed JSON value's kind, for error messages: "an array", "a string", "null", ..."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
