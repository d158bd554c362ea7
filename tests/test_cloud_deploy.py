"""`trainer.cloud deploy` and `predict` (trainer.cloud.deploy, endpoint_predict), and the serving image's
entry point under Vertex AI's custom-container contract. Nothing reaches Google: the dry run, fake
aiplatform and Cloud Storage clients, and the serving image's command run here with AIP_* set."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from google.cloud import aiplatform_v1 as aip
from PIL import Image

from tests.serving_fixtures import make_image_bytes, write_test_export
from tests.test_containers import exec_form
from trainer.cloud import cli, deploy, endpoint_predict, images, local_run, vertex_specs
from trainer.serving.contract import SERVING_SIGNATURE

WHERE = ["--project", "my-project", "--region", "europe-west4"]
PARENT = "projects/my-project/locations/europe-west4"


class Operation:
    """What the clients' long-running calls return."""

    def __init__(self, result):
        self._result = result

    def result(self, timeout=None):
        return self._result


class FakeModels:
    def __init__(self):
        self.uploads = []

    def upload_model(self, parent, model):
        self.uploads.append((parent, model))
        return Operation(aip.UploadModelResponse(model=f"{parent}/models/{len(self.uploads)}"))


class FakeEndpoints:
    def __init__(self, existing=()):
        self.endpoints, self.created, self.deploys = list(existing), [], []

    def list_endpoints(self, parent, filter):
        name = re.fullmatch(r'display_name="(.*)"', filter).group(1)
        return [e for e in self.endpoints if e.display_name == name and e.name.startswith(parent)]

    def create_endpoint(self, parent, endpoint):
        created = aip.Endpoint(name=f"{parent}/endpoints/{100 + len(self.created)}", display_name=endpoint.display_name)
        self.created.append(created)
        self.endpoints.append(created)
        return Operation(created)

    def deploy_model(self, endpoint, deployed_model, traffic_split):
        self.deploys.append((endpoint, deployed_model, dict(traffic_split)))
        return Operation(aip.DeployModelResponse(deployed_model=deployed_model))


class FakeStorage:
    """Cloud Storage as a dict of gs:// address -> bytes."""

    def __init__(self):
        self.objects = {}

    def bucket(self, name):
        storage = self

        class Blob:
            def __init__(self, blob_name):
                self.uri = f"gs://{name}/{blob_name}"

            def upload_from_filename(self, path):
                storage.objects[self.uri] = open(path, "rb").read()

        return type("Bucket", (), {"blob": lambda self, blob_name: Blob(blob_name)})()


def deploy_argv(model_dir, *extra):
    return ["deploy", "--model_dir", model_dir, *WHERE, "--endpoint_name", "digits", *extra]


def printed_requests(text: str) -> dict[str, object]:
    """The dry run's YAML documents by request type, parsed through the SDK's types."""
    kinds = {"UploadModelRequest": aip.UploadModelRequest, "CreateEndpointRequest": aip.CreateEndpointRequest,
             "DeployModelRequest": aip.DeployModelRequest}
    found = {}
    for document in text.split("---\n")[1:]:
        title, body = document.split("\n", 1)
        kind = title.lstrip("# ").split(" ")[0]
        found[kind] = vertex_specs.spec_from_yaml(body.split("# Equivalent gcloud commands")[0], kinds[kind])
    return found


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A local export (a --local_run's) deployed through fake clients: the serving copy is real."""
    export = write_test_export(str(tmp_path_factory.mktemp("runs") / "r1" / "export"))
    clients = deploy.DeployClients(FakeModels(), FakeEndpoints(), FakeStorage())
    out = io.StringIO()
    argv = deploy_argv(export, "--artifact_dir", "gs://my-bucket/models/r1", "--max_replicas", "2")
    endpoint = cli.run(argv, out=out, client=clients)
    dry = io.StringIO()
    cli.run([*argv, "--dry_run"], out=dry)
    return {"export": export, "clients": clients, "out": out.getvalue(), "endpoint": endpoint, "dry": dry.getvalue()}


def test_deploy_uploads_the_serving_copy_then_creates_the_endpoint_and_deploys_with_all_traffic(deployed):
    import tensorflow as tf

    copy = deployed["export"] + "_bytes_only"
    assert set(tf.saved_model.load(copy).signatures) == {SERVING_SIGNATURE}  # what the endpoint can run
    files = {os.path.relpath(os.path.join(d, n), copy) for d, _, names in os.walk(copy) for n in names}
    clients = deployed["clients"]
    assert clients.storage.objects.keys() == {f"gs://my-bucket/models/r1/{f}" for f in files}
    assert clients.storage.objects["gs://my-bucket/models/r1/saved_model.pb"] == open(f"{copy}/saved_model.pb", "rb").read()
    [(parent, model)] = clients.models.uploads
    assert parent == PARENT and model.artifact_uri == "gs://my-bucket/models/r1" and model.display_name == "imagepipe-r1"
    assert model.container_spec.image_uri == images.image_uri("serve", "my-project", "europe-west4")
    assert [p.container_port for p in model.container_spec.ports] == [images.SERVING_PORT]
    [created] = clients.endpoints.created
    assert created.display_name == "digits" and deployed["endpoint"] == created.name
    [(endpoint, deployed_model, split)] = clients.endpoints.deploys
    assert endpoint == created.name and split == {"0": 100} and deployed_model.model == f"{PARENT}/models/1"
    resources = deployed_model.dedicated_resources
    assert (resources.machine_spec.machine_type, resources.min_replica_count, resources.max_replica_count) == \
        ("n1-standard-2", 1, 2)
    # the dry run printed these same requests
    requests = printed_requests(deployed["dry"])
    assert requests["UploadModelRequest"].model == model
    assert requests["DeployModelRequest"].deployed_model == aip.DeployedModel(deployed_model, model=f"{PARENT}/models/MODEL_ID")
    assert f"python -m trainer.cloud predict --endpoint {created.name}" in deployed["out"]


def test_a_second_deploy_reuses_the_copy_and_the_endpoint_and_shares_the_traffic(deployed):
    existing = aip.Endpoint(name=f"{PARENT}/endpoints/7", display_name="digits", traffic_split={"41": 100})
    clients = deploy.DeployClients(FakeModels(), FakeEndpoints([existing]), FakeStorage())
    out = io.StringIO()
    cli.run(deploy_argv(deployed["export"], "--artifact_dir", "gs://my-bucket/models/r1b", "--traffic_percent", "30"),
            out=out, client=clients)
    assert f"reusing the serving copy {deployed['export']}_bytes_only" in out.getvalue()
    assert clients.endpoints.created == [] and f"reusing endpoint {existing.name}" in out.getvalue()
    [(endpoint, _, split)] = clients.endpoints.deploys
    assert endpoint == existing.name and split == {"0": 30, "41": 70}


def test_the_dry_run_prints_requests_that_round_trip_through_sdk_types_and_the_gcloud_commands():
    out = io.StringIO()
    assert cli.run(deploy_argv("gs://my-bucket/runs/r1/export", "--machine", "n1-standard-4", "--min_replicas", "2",
                               "--max_replicas", "3", "--dry_run"), out=out) is None
    text = out.getvalue()
    requests = printed_requests(text)
    model = requests["UploadModelRequest"].model
    assert requests["UploadModelRequest"].parent == PARENT
    assert model.artifact_uri == "gs://my-bucket/runs/r1/export_bytes_only"
    container = model.container_spec
    assert container.image_uri == images.image_uri("serve", "my-project", "europe-west4")
    assert (container.predict_route, container.health_route) == (deploy.PREDICT_ROUTE, deploy.HEALTH_ROUTE)
    assert requests["CreateEndpointRequest"].endpoint.display_name == "digits"
    deploy_request = requests["DeployModelRequest"]
    assert deploy_request.traffic_split == {"0": 100}
    resources = deploy_request.deployed_model.dedicated_resources
    assert (resources.machine_spec.machine_type, resources.min_replica_count, resources.max_replica_count) == \
        ("n1-standard-4", 2, 3)
    commands = text.split("# Equivalent gcloud commands:\n")[1].splitlines()
    assert commands[0] == (
        "gcloud ai models upload --project=my-project --region=europe-west4 --display-name=imagepipe-r1 "
        f"--artifact-uri=gs://my-bucket/runs/r1/export_bytes_only --container-image-uri={container.image_uri} "
        f"--container-ports=8080 --container-predict-route={deploy.PREDICT_ROUTE} "
        f"--container-health-route={deploy.HEALTH_ROUTE}")
    assert commands[1] == "gcloud ai endpoints create --project=my-project --region=europe-west4 --display-name=digits"
    assert commands[2] == (
        "gcloud ai endpoints deploy-model ENDPOINT_ID --project=my-project --region=europe-west4 --model=MODEL_ID "
        "--display-name=imagepipe-r1 --machine-type=n1-standard-4 --min-replica-count=2 --max-replica-count=3 "
        "--traffic-split=0=100")


@pytest.mark.parametrize("percent, current, split", [
    (100, {}, {"0": 100}),
    (20, {"a": 100}, {"0": 20, "a": 80}),
    (25, {"a": 50, "b": 50}, {"0": 25, "a": 38, "b": 37}),  # largest remainders, summing to 100
    (10, {"a": 60, "b": 40, "c": 0}, {"0": 10, "a": 54, "b": 36}),
    (100, {"a": 100}, {"0": 100}),
])
def test_the_new_model_takes_its_share_and_the_others_keep_their_proportions(percent, current, split):
    assert deploy.traffic_split(percent, current) == split and sum(split.values()) == 100


@pytest.mark.parametrize("extra, message", [
    (["--traffic_percent", "0"], "--traffic_percent must be in 1..100"),
    (["--min_replicas", "3", "--max_replicas", "2"], "1 <= min <= max"),
    (["--accelerator", "NVIDIA_TESLA_T4:1"], "the serving image runs TensorFlow on CPU"),
])
def test_deployments_that_cannot_work_are_refused_with_the_fix(extra, message):
    with pytest.raises(deploy.DeployError, match=re.escape(message)):
        cli.run(deploy_argv("gs://b/runs/r1/export", *extra, "--dry_run"), out=io.StringIO())
    with pytest.raises(deploy.DeployError, match="is local: pass --artifact_dir gs://"):
        cli.run(deploy_argv("runs/r1/export", "--dry_run"), out=io.StringIO())
    with pytest.raises(deploy.DeployError, match="no model taking traffic"):
        deploy.traffic_split(50, {})


class RecordingPost:
    """The transport `predict` takes: records each body and answers one prediction per instance,
    naming the instance's size so a test can match answers to files."""

    def __init__(self):
        self.bodies = []

    def __call__(self, body: bytes) -> dict:
        self.bodies.append(body)
        sizes = [len(base64.b64decode(i["b64"])) for i in json.loads(body)["instances"]]
        return {"predictions": [{"class_name": str(n), "class_index": n, "probability": 1.0, "probabilities": [1.0]}
                                for n in sizes], "deployedModelId": "1"}


def noise_png(path, side: int) -> str:
    """A PNG of random pixels: incompressible, so about 3 x side^2 bytes."""
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return str(path)


def test_predict_splits_requests_under_the_body_limit_and_the_instance_count(tmp_path):
    paths = [noise_png(tmp_path / f"big{i}.png", 316 + i) for i in range(9)]  # ~300 KB, ~400 KB in base64
    paths += [noise_png(tmp_path / f"small{i}.png", 8 + i) for i in range(5)]
    paths.append(noise_png(tmp_path / "huge.png", 830))  # ~2 MB: over the limit alone
    (tmp_path / "notes.txt").write_text("not an image")
    paths[3:3] = [str(tmp_path / "missing.jpg"), str(tmp_path / "notes.txt")]
    post = RecordingPost()
    lines = [json.loads(line) for line, _ in endpoint_predict.predict_files(paths, post, max_instances=4)]
    assert [line["file"] for line in lines] == paths  # one line per file, in order
    assert all(len(body) <= endpoint_predict.MAX_BODY_BYTES for body in post.bodies)
    counts = [len(json.loads(body)["instances"]) for body in post.bodies]
    # 3 x 400 KB fit in 1.5 MB and a 4th does not; the third request takes a small file too, up to 4
    assert counts == [3, 3, 4, 4]
    for line, path in zip(lines, paths):
        if path.endswith("missing.jpg"):
            assert line["error"].startswith("cannot read: No such file")
        elif path.endswith("notes.txt"):  # refused by its header, as trainer.predict refuses it, and never sent
            assert line["error"].startswith("ImageRejected: ")
        elif path.endswith("huge.png"):
            assert "-byte request alone, over the limit of 1,500,000 bytes" in line["error"]
        else:
            size = os.path.getsize(path)
            assert line == {"file": path, "class_name": str(size), "class_index": size, "probability": 1.0}


def test_an_instance_the_server_refuses_fails_alone_and_the_others_are_sent_again(tmp_path):
    paths = [noise_png(tmp_path / f"{i}.png", 8 + i) for i in range(4)]
    bad = os.path.getsize(paths[2])
    recording = RecordingPost()

    def post(body: bytes) -> dict:  # trainer.serve's answer to an image it cannot decode
        sizes = [len(base64.b64decode(i["b64"])) for i in json.loads(body)["instances"]]
        if bad in sizes:
            raise endpoint_predict.PredictError(f'HTTP 400 from u: {{"error": "instance {sizes.index(bad)}: broken"}}')
        return recording(body)

    lines = [json.loads(line) for line, _ in endpoint_predict.predict_files(paths, post)]
    assert [("error" in line) for line in lines] == [False, False, True, False]
    assert "instance 2: broken" in lines[2]["error"]
    assert [len(json.loads(b)["instances"]) for b in recording.bodies] == [3]  # sent once more, without it


def test_an_endpoint_is_addressed_by_resource_name_or_by_id_with_project_and_region():
    url = "https://europe-west4-aiplatform.googleapis.com/v1/projects/p/locations/europe-west4/endpoints/12:predict"
    assert endpoint_predict.endpoint_url("projects/p/locations/europe-west4/endpoints/12", None, None) == url
    assert endpoint_predict.endpoint_url("12", "p", "europe-west4") == url
    with pytest.raises(endpoint_predict.PredictError, match="pass --project and --region"):
        endpoint_predict.endpoint_url("12", None, None)


def wait_for_health(url: str, server: subprocess.Popen, log_path: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited {server.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer on {url} within {timeout} s:\n{open(log_path).read()[-3000:]}")


@pytest.mark.slow
def test_the_serving_images_entrypoint_serves_the_deployed_copy_on_vertex_ais_routes(deployed, tmp_path, capsys):
    """The serving Dockerfile's exact ENTRYPOINT, in this venv, with the variables Vertex AI sets from
    the uploaded Model (a free port here instead of 8080); `predict --endpoint_url` against it, in
    requests small enough to need three, prints what `trainer.predict` prints for the same files."""
    [(_, model)] = deployed["clients"].models.uploads
    command = exec_form(images.IMAGES["serve"].dockerfile, "ENTRYPOINT")
    [port] = local_run.free_ports(1)
    env = dict(os.environ, AIP_HTTP_PORT=str(port), AIP_HEALTH_ROUTE=model.container_spec.health_route,
               AIP_PREDICT_ROUTE=model.container_spec.predict_route, AIP_STORAGE_URI=deployed["export"] + "_bytes_only")
    log_path = str(tmp_path / "server.log")
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, *command[1:]], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_health(f"http://127.0.0.1:{port}{model.container_spec.health_route}", server, log_path)
        files = []
        for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (20, 30, 210)] * 2):
            files.append(str(tmp_path / f"{i}.png"))
            open(files[-1], "wb").write(make_image_bytes(colour, "PNG", size=(60, 50)))
        files.insert(4, str(tmp_path / "truncated.jpg"))  # its header reads; its pixels do not decode
        open(files[4], "wb").write(make_image_bytes((200, 200, 200), "JPEG", size=(60, 50))[:400])
        url = f"http://127.0.0.1:{port}{model.container_spec.predict_route}"
        http_post, bodies = endpoint_predict.make_post(url, with_credentials=False), []

        def post(body: bytes) -> dict:
            bodies.append(body)
            return http_post(body)

        out = io.StringIO()
        limit = 2 * max(len(endpoint_predict.instance(open(f, "rb").read())) for f in files) + 40
        code = cli.run(["predict", "--endpoint_url", url, "--max_body_bytes", str(limit), *files], out=out, client=post)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert code == 1, out.getvalue()  # the truncated file failed
    # two per request under that body limit; the server refuses the truncated one, and its partner goes again
    assert [len(json.loads(b)["instances"]) for b in bodies] == [2, 2, 2, 1, 1]
    from trainer.serving.predict import run as local_predict

    assert local_predict(["--model", deployed["export"], *files]) == 1
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [g.keys() for g in got] == [e.keys() for e in expected]  # the same lines, an error where it has one
    assert [g.get("class_name") for g in got] == [e.get("class_name") for e in expected] == \
        ["red", "green", "blue", "red", None, "green", "blue"]
    assert all(g["probability"] == pytest.approx(e["probability"], rel=1e-5) for g, e in zip(got, expected)
               if "error" not in g)
