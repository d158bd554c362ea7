"""`python -m trainer.cloud deploy`: an export to a Vertex AI endpoint.

    python -m trainer.cloud deploy --model_dir gs://b/runs/r1/export --project P --region R \\
        --endpoint_name E [--machine n1-standard-2] [--min_replicas 1] [--max_replicas 1] \\
        [--traffic_percent 100] [--dry_run]

1. The serving copy: `<model_dir>_bytes_only`, the export with `serving_default` only
   (`python -m trainer.bytes_only_export`; an endpoint would offer every signature, and
   `predict_filenames` reads paths sent by clients). Made once, reused after. A local --model_dir
   (a --local_run) is copied here and uploaded to --artifact_dir on gs://.
2. Upload: a Model in the Model Registry with that copy and the serving image (containers/serve.Dockerfile,
   which `make push` pushed; --image_uri for another), answering on port 8080 at TF Serving's routes.
3. The endpoint named --endpoint_name: reused if one exists, else created.
4. Deploy: the model on dedicated machines, taking --traffic_percent of the traffic; the models
   already there share the rest in their current proportions.
`--dry_run` prints each request (YAML, through the SDK's types) and the equivalent gcloud commands.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Sequence

from google.cloud import aiplatform_v1 as aip

from shared.paths import is_remote
from trainer.cloud import images, vertex_specs

SERVING_COPY_SUFFIX = "_bytes_only"  # trainer.bytes_only_export's example: runs/r1/export -> runs/r1/export_bytes_only
DEFAULT_MACHINE = "n1-standard-2"
# TF Serving's REST paths for the model named "model", which trainer.serve answers; Vertex AI passes
# them to the container as AIP_PREDICT_ROUTE and AIP_HEALTH_ROUTE.
PREDICT_ROUTE = "/v1/models/model:predict"
HEALTH_ROUTE = "/v1/models/model"


class DeployError(RuntimeError):
    """The deployment cannot be made; the message names the flag or resource."""


@dataclasses.dataclass
class DeployClients:
    """The aiplatform_v1 clients (and a Cloud Storage client, for a local --model_dir); tests pass fakes."""
    models: object
    endpoints: object
    storage: object | None = None


def add_command_parser(sub) -> None:
    p = sub.add_parser("deploy", help="upload an export and deploy it to an endpoint", allow_abbrev=False,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="the export a training run wrote (<job_dir>/export)")
    p.add_argument("--project", required=True)
    p.add_argument("--region", default="us-central1")
    p.add_argument("--endpoint_name", required=True, help="display name of the endpoint; reused if it exists")
    p.add_argument("--model_name", default=None, help="display name in the Model Registry; default from --model_dir")
    p.add_argument("--artifact_dir", default=None,
                   help="gs:// folder for the serving copy; needed when --model_dir is local")
    p.add_argument("--image_uri", default=None, help="the serving image; default: what `make push` pushed")
    p.add_argument("--repository", default=images.DEFAULT_REPOSITORY)
    p.add_argument("--machine", default=DEFAULT_MACHINE)
    p.add_argument("--accelerator", default=None, help="TYPE:COUNT, with --image_uri of a GPU serving image")
    p.add_argument("--min_replicas", type=int, default=1)
    p.add_argument("--max_replicas", type=int, default=1)
    p.add_argument("--traffic_percent", type=int, default=100, help="of the endpoint's traffic for this model")
    p.add_argument("--dry_run", action="store_true", help="print the requests and gcloud commands; change nothing")


def serving_copy_dir(model_dir: str) -> str:
    return model_dir.rstrip("/") + SERVING_COPY_SUFFIX


def _parent(ns: argparse.Namespace) -> str:
    return f"projects/{ns.project}/locations/{ns.region}"


def check_flags(ns: argparse.Namespace) -> None:
    problems = []
    if not 0 < ns.traffic_percent <= 100:
        problems.append(f"--traffic_percent must be in 1..100, got {ns.traffic_percent}")
    if not 1 <= ns.min_replicas <= ns.max_replicas:
        problems.append(f"--min_replicas and --max_replicas need 1 <= min <= max, got {ns.min_replicas}, {ns.max_replicas}")
    if not is_remote(ns.model_dir) and not (ns.artifact_dir or "").startswith("gs://"):
        problems.append(f"--model_dir {ns.model_dir} is local: pass --artifact_dir gs://... for its serving copy "
                        f"(Vertex AI reads models from Cloud Storage)")
    if is_remote(ns.model_dir) and not ns.model_dir.startswith("gs://"):
        problems.append(f"--model_dir {ns.model_dir}: Vertex AI reads models from gs:// only")
    if ns.accelerator and not ns.image_uri:
        problems.append("the serving image runs TensorFlow on CPU (containers/serve.Dockerfile): pass --image_uri "
                        "with a GPU serving image to use --accelerator")
    if problems:
        raise DeployError("; ".join(problems))


def build_model(ns: argparse.Namespace, artifact_uri: str) -> aip.Model:
    image = ns.image_uri or images.image_uri("serve", ns.project, ns.region, ns.repository)
    name = ns.model_name or "imagepipe-" + os.path.basename(os.path.dirname(ns.model_dir.rstrip("/")) or "model")
    container = aip.ModelContainerSpec(image_uri=image, ports=[aip.Port(container_port=images.SERVING_PORT)],
                                       predict_route=PREDICT_ROUTE, health_route=HEALTH_ROUTE)
    return aip.Model(display_name=name, artifact_uri=artifact_uri, container_spec=container)


def build_deployed_model(ns: argparse.Namespace, model_name: str, display_name: str) -> aip.DeployedModel:
    acc_type, acc_count = vertex_specs.parse_accelerator(ns.accelerator)
    machine = aip.MachineSpec(machine_type=ns.machine)
    if acc_type:
        machine = aip.MachineSpec(machine_type=ns.machine, accelerator_type=acc_type, accelerator_count=acc_count)
    resources = aip.DedicatedResources(machine_spec=machine, min_replica_count=ns.min_replicas,
                                       max_replica_count=ns.max_replicas)
    return aip.DeployedModel(model=model_name, display_name=display_name, dedicated_resources=resources)


def traffic_split(percent: int, current: dict[str, int]) -> dict[str, int]:
    """The new model ("0", Vertex AI's key for the model being deployed) takes `percent`; the models
    that have traffic now share the rest in their current proportions (largest remainders), summing to 100."""
    current = {k: v for k, v in current.items() if v > 0}
    if not current:
        if percent != 100:
            raise DeployError(f"--traffic_percent {percent}: the endpoint has no model taking traffic to send the "
                              f"other {100 - percent}% to; deploy the first model with 100")
        return {"0": 100}
    rest, total = 100 - percent, sum(current.values())
    shares = {k: rest * v / total for k, v in current.items()}
    split = {k: int(share) for k, share in shares.items()}
    for k in sorted(shares, key=lambda k: shares[k] - split[k], reverse=True)[:rest - sum(split.values())]:
        split[k] += 1
    return {"0": percent, **{k: v for k, v in split.items() if v}}


def gcloud_commands(ns: argparse.Namespace, model: aip.Model, deployed: aip.DeployedModel, split: dict) -> list[str]:
    where = f"--project={shlex.quote(ns.project)} --region={shlex.quote(ns.region)}"
    c = model.container_spec
    upload = (f"gcloud ai models upload {where} --display-name={shlex.quote(model.display_name)} "
              f"--artifact-uri={shlex.quote(model.artifact_uri)} --container-image-uri={shlex.quote(c.image_uri)} "
              f"--container-ports={c.ports[0].container_port} --container-predict-route={shlex.quote(c.predict_route)} "
              f"--container-health-route={shlex.quote(c.health_route)}")
    create = f"gcloud ai endpoints create {where} --display-name={shlex.quote(ns.endpoint_name)}"
    r = deployed.dedicated_resources
    accelerator = ""
    if r.machine_spec.accelerator_count:
        kind = r.machine_spec.accelerator_type.name.lower().replace("_", "-")
        accelerator = f" --accelerator=type={kind},count={r.machine_spec.accelerator_count}"
    deploy = (f"gcloud ai endpoints deploy-model ENDPOINT_ID {where} --model=MODEL_ID "
              f"--display-name={shlex.quote(deployed.display_name)} --machine-type={r.machine_spec.machine_type}"
              f"{accelerator} --min-replica-count={r.min_replica_count} --max-replica-count={r.max_replica_count} "
              f"--traffic-split={','.join(f'{k}={v}' for k, v in split.items())}")
    return [upload, create, deploy]


def how_to_call(endpoint: str, region: str) -> str:
    return (f"# Predict with it:\npython -m trainer.cloud predict --endpoint {endpoint} image1.jpg image2.png\n"
            f"# or, with a request body {{\"instances\": [{{\"b64\": \"...\"}}]}} in request.json:\n"
            f"curl -X POST -H \"Authorization: Bearer $(gcloud auth print-access-token)\" "
            f"-H \"Content-Type: application/json\" -d @request.json "
            f"https://{region}-aiplatform.googleapis.com/v1/{endpoint}:predict\n")


def make_serving_copy(model_dir: str, copy_dir: str, out) -> None:
    """`python -m trainer.bytes_only_export` in its own process: it loads TensorFlow, which this
    command does not (and the two SavedModels it loads are freed when it exits)."""
    out.write(f"making the serving copy {copy_dir} (serving_default only) of {model_dir}\n")
    out.flush()
    done = subprocess.run([sys.executable, "-m", "trainer.bytes_only_export", "--model", model_dir,
                           "--output", copy_dir], capture_output=True, text=True)
    if done.returncode != 0:
        raise DeployError(f"the serving copy of {model_dir} failed (exit {done.returncode}): {done.stderr[-2000:]}")


def copy_exists(copy_dir: str, storage=None) -> bool:
    if not is_remote(copy_dir):
        return os.path.exists(os.path.join(copy_dir, "saved_model.pb"))
    bucket, _, prefix = copy_dir[len("gs://"):].partition("/")
    return any(True for _ in storage.list_blobs(bucket, prefix=prefix.rstrip("/") + "/saved_model.pb", max_results=1))


def upload_folder(local_dir: str, gcs_dir: str, storage) -> int:
    """Every file under local_dir to the same relative name under gcs_dir; returns the file count."""
    bucket_name, _, prefix = gcs_dir[len("gs://"):].partition("/")
    bucket = storage.bucket(bucket_name)
    count = 0
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, local_dir).replace(os.sep, "/")
            bucket.blob(f"{prefix.rstrip('/')}/{relative}" if prefix else relative).upload_from_filename(path)
            count += 1
    return count


def prepare_artifact(ns: argparse.Namespace, clients: DeployClients, out) -> str:
    """The serving copy in Cloud Storage (made and uploaded when missing); returns its gs:// folder."""
    copy_dir = serving_copy_dir(ns.model_dir)
    if copy_exists(copy_dir, clients.storage):
        out.write(f"reusing the serving copy {copy_dir}\n")
    else:
        make_serving_copy(ns.model_dir, copy_dir, out)
    if is_remote(copy_dir):
        return copy_dir
    count = upload_folder(copy_dir, ns.artifact_dir, clients.storage)
    out.write(f"uploaded {count} files of {copy_dir} to {ns.artifact_dir}\n")
    return ns.artifact_dir


def find_or_create_endpoint(ns: argparse.Namespace, clients: DeployClients, out) -> aip.Endpoint:
    found = list(clients.endpoints.list_endpoints(parent=_parent(ns), filter=f'display_name="{ns.endpoint_name}"'))
    if len(found) > 1:
        raise DeployError(f"{len(found)} endpoints are named {ns.endpoint_name!r}: {[e.name for e in found]}; "
                          f"rename all but one")
    if found:
        out.write(f"reusing endpoint {found[0].name}\n")
        return found[0]
    endpoint = clients.endpoints.create_endpoint(parent=_parent(ns), endpoint=aip.Endpoint(
        display_name=ns.endpoint_name)).result()
    out.write(f"created endpoint {endpoint.name}\n")
    return endpoint


def run(ns: argparse.Namespace, out=sys.stdout, clients: DeployClients | None = None) -> str | None:
    """Prints (--dry_run) or makes the deployment; returns the endpoint's resource name (None in a dry run)."""
    check_flags(ns)
    if ns.dry_run:
        artifact = ns.artifact_dir if not is_remote(ns.model_dir) else serving_copy_dir(ns.model_dir)
        model = build_model(ns, artifact)
        endpoint, model_name = f"{_parent(ns)}/endpoints/ENDPOINT_ID", f"{_parent(ns)}/models/MODEL_ID"
        deployed = build_deployed_model(ns, model_name, model.display_name)
        split = {"0": ns.traffic_percent}
        requests = [("UploadModelRequest", aip.UploadModelRequest(parent=_parent(ns), model=model)),
                    (f"CreateEndpointRequest (only if no endpoint is named {ns.endpoint_name!r})",
                     aip.CreateEndpointRequest(parent=_parent(ns), endpoint=aip.Endpoint(display_name=ns.endpoint_name))),
                    ("DeployModelRequest" + ("" if ns.traffic_percent == 100 else
                                             f" (the models already deployed share the other {100 - ns.traffic_percent}%)"),
                     aip.DeployModelRequest(endpoint=endpoint, deployed_model=deployed, traffic_split=split))]
        out.write(f"# dry run: nothing uploaded or deployed. First: the serving copy {serving_copy_dir(ns.model_dir)}"
                  f" of {ns.model_dir}" + (f", uploaded to {ns.artifact_dir}" if not is_remote(ns.model_dir) else "") + "\n")
        for title, request in requests:
            out.write(f"---\n# {title}\n{vertex_specs.spec_to_yaml(request)}")
        out.write("# Equivalent gcloud commands:\n" + "\n".join(gcloud_commands(ns, model, deployed, split)) + "\n")
        out.write(how_to_call(endpoint, ns.region))
        return None
    clients = clients or default_clients(ns.region)
    artifact = prepare_artifact(ns, clients, out)
    model = build_model(ns, artifact)
    uploaded = clients.models.upload_model(parent=_parent(ns), model=model).result()
    out.write(f"uploaded model {uploaded.model}\n")
    endpoint = find_or_create_endpoint(ns, clients, out)
    split = traffic_split(ns.traffic_percent, dict(endpoint.traffic_split))
    deployed = build_deployed_model(ns, uploaded.model, model.display_name)
    clients.endpoints.deploy_model(endpoint=endpoint.name, deployed_model=deployed, traffic_split=split).result()
    out.write(f"deployed {model.display_name} to {endpoint.name} with traffic {split}\n{how_to_call(endpoint.name, ns.region)}")
    return endpoint.name


def default_clients(region: str) -> DeployClients:
    from google.cloud import storage

    options = {"api_endpoint": f"{region}-aiplatform.googleapis.com"}
    return DeployClients(aip.ModelServiceClient(client_options=options),
                         aip.EndpointServiceClient(client_options=options), storage.Client())
