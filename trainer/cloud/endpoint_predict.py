"""`python -m trainer.cloud predict`: image files to a deployed endpoint, one JSON line per file.

    python -m trainer.cloud predict --endpoint projects/P/locations/R/endpoints/ID img1.jpg img2.png ...
    python -m trainer.cloud predict --endpoint ID --project P --region R *.jpg
    python -m trainer.cloud predict --endpoint_url http://localhost:8080/v1/models/model:predict *.jpg

Each image file goes as a {"b64": ...} instance, in requests kept under the online prediction body
limit (1.5 MB) and --max_instances; each line is {"file", "class_name", "class_index", "probability"}
as `python -m trainer.predict` prints it, or {"file", "error"} (a file that is not an image by its
header is not sent), and the exit status is 1 if any failed.
--endpoint_url posts to any server that speaks the same contract (the serving image, or
`python -m trainer.serve` started with AIP_HTTP_PORT) without Google credentials.
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import urllib.error
import urllib.request
from typing import Callable, Iterator, Sequence

from shared import image_check

MAX_BODY_BYTES = 1_500_000  # Vertex AI's online prediction payload limit ("currently, 1.5MB", gcloud's help)
DEFAULT_MAX_INSTANCES = 64  # trainer.serve's default --max_instances
LINE_KEYS = ("class_name", "class_index", "probability")  # after "file": trainer.predict's line
_ENDPOINT = re.compile(r"^projects/[^/]+/locations/([^/]+)/endpoints/[^/]+$")
_REFUSED_INSTANCE = re.compile(r"HTTP 400 .*\binstance (\d+)\b")  # trainer.serve names the instance it refuses

Post = Callable[[bytes], dict]  # a request body -> the response's JSON


class PredictError(RuntimeError):
    """A request failed as a whole; the message carries the status and the server's words."""


def add_command_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict image files with a deployed endpoint", allow_abbrev=False,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="projects/P/locations/R/endpoints/ID, or an ID with --project and --region")
    where.add_argument("--endpoint_url", help="POST here instead (http://host:port/route), without credentials")
    p.add_argument("--project", default=None)
    p.add_argument("--region", default=None)
    p.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES, help="largest request (default: %(default)s)")
    p.add_argument("--max_instances", type=int, default=DEFAULT_MAX_INSTANCES, help="most files per request")
    p.add_argument("--max_pixels", type=int, default=image_check.DEFAULT_MAX_PIXELS,
                   help="refuse images whose header claims more pixels, unsent (default: %(default)s, the ETL's)")
    p.add_argument("files", nargs="+", help="local image files")


def endpoint_url(endpoint: str, project: str | None, region: str | None) -> str:
    """The REST predict URL of an endpoint given by resource name, or by id with project and region."""
    if "/" not in endpoint:
        if not (project and region):
            raise PredictError(f"--endpoint {endpoint} is an id: pass --project and --region too")
        endpoint = f"projects/{project}/locations/{region}/endpoints/{endpoint}"
    match = _ENDPOINT.match(endpoint)
    if not match:
        raise PredictError(f"--endpoint {endpoint!r} is not projects/P/locations/R/endpoints/ID")
    return f"https://{match.group(1)}-aiplatform.googleapis.com/v1/{endpoint}:predict"


def make_post(url: str, with_credentials: bool, timeout: float = 120) -> Post:
    """A JSON POST to `url`; with Google's application default credentials for a Vertex AI endpoint."""
    token = None
    if with_credentials:
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        token = credentials.token

    def post(body: bytes) -> dict:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise PredictError(f"HTTP {e.code} from {url}: {e.read()[:500].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as e:
            raise PredictError(f"no answer from {url}: {getattr(e, 'reason', e)}") from None
    return post


def instance(data: bytes) -> bytes:
    return json.dumps({"b64": base64.b64encode(data).decode("ascii")}).encode()


def request_body(instances: Sequence[bytes]) -> bytes:
    return b'{"instances": [' + b", ".join(instances) + b"]}"


def plan_requests(paths: Sequence[str], max_body_bytes: int, max_instances: int,
                  max_pixels: int = image_check.DEFAULT_MAX_PIXELS
                  ) -> Iterator[list[tuple[str, bytes | str]]]:
    """Groups of files in the files' order, each [(path, its instance | why it cannot go)], whose
    instances make one request of at most max_body_bytes and max_instances. A file that is not an
    image (by its header, as trainer.predict checks) fails here, unsent. One group is held at a time."""
    empty = len(request_body([]))
    group: list[tuple[str, bytes | str]] = []
    count, size = 0, empty
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            image_check.read_header(data, max_pixels)
        except OSError as e:
            group.append((path, f"cannot read: {e.strerror}"))
            continue
        except image_check.ImageRejected as e:
            group.append((path, f"{type(e).__name__}: {e}"))
            continue
        part = instance(data)
        if empty + len(part) > max_body_bytes:
            group.append((path, f"the file makes a {empty + len(part):,}-byte request alone, over the limit of "
                                f"{max_body_bytes:,} bytes: resize it first"))
            continue
        if count and (size + len(b", ") + len(part) > max_body_bytes or count == max_instances):
            yield group
            group, count, size = [], 0, empty
        size += len(part) + (len(b", ") if count else 0)
        count += 1
        group.append((path, part))
    if group:
        yield group


def prediction_line(path: str, prediction: dict) -> str:
    return json.dumps({"file": path, **{k: prediction[k] for k in LINE_KEYS}})


def predict_group(group: list[tuple[str, bytes | str]], post: Post) -> list[tuple[str, bool]]:
    """(line, ok) per file of one group. When the server refuses one instance by number (trainer.serve's
    400 "instance N: ..."), that file fails and the others are sent again without it."""
    results: dict[int, tuple[str, bool]] = {i: (json.dumps({"file": path, "error": item}), False)
                                            for i, (path, item) in enumerate(group) if isinstance(item, str)}
    sending = [i for i, (_, item) in enumerate(group) if isinstance(item, bytes)]
    while sending:
        try:
            answer = post(request_body([group[i][1] for i in sending])).get("predictions")
            if not isinstance(answer, list) or len(answer) != len(sending):
                raise PredictError(f"the answer holds {answer!r:.200} for {len(sending)} instances")
        except PredictError as e:
            refused = _REFUSED_INSTANCE.search(str(e))
            if refused and int(refused.group(1)) < len(sending):
                i = sending.pop(int(refused.group(1)))
                results[i] = (json.dumps({"file": group[i][0], "error": str(e)}), False)
                continue
            results.update({i: (json.dumps({"file": group[i][0], "error": str(e)}), False) for i in sending})
            break
        results.update({i: (prediction_line(group[i][0], p), True) for i, p in zip(sending, answer)})
        break
    return [results[i] for i in range(len(group))]


def predict_files(paths: Sequence[str], post: Post, max_body_bytes: int = MAX_BODY_BYTES,
                  max_instances: int = DEFAULT_MAX_INSTANCES,
                  max_pixels: int = image_check.DEFAULT_MAX_PIXELS) -> Iterator[tuple[str, bool]]:
    """(line, ok) per file, in the files' order."""
    for group in plan_requests(paths, max_body_bytes, max_instances, max_pixels):
        yield from predict_group(group, post)


def run(ns: argparse.Namespace, out=sys.stdout, post: Post | None = None) -> int:
    if ns.max_body_bytes <= 0 or ns.max_instances <= 0:
        raise PredictError("--max_body_bytes and --max_instances must be positive")
    if post is None:
        url = ns.endpoint_url or endpoint_url(ns.endpoint, ns.project, ns.region)
        post = make_post(url, with_credentials=ns.endpoint_url is None)
    total = failed = 0
    for line, ok in predict_files(ns.files, post, ns.max_body_bytes, ns.max_instances, ns.max_pixels):
        out.write(line + "\n")
        out.flush()
        total += 1
        failed += not ok
    if failed:
        print(f"{failed} of {total} images failed", file=sys.stderr)
    return 1 if failed else 0
