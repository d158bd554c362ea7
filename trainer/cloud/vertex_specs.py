"""Vertex AI CustomJob and HyperparameterTuningJob specs, built from the SDK's own types.

Building through `google.cloud.aiplatform_v1` types means a misspelt or misplaced field fails
here, not in the cloud: the book's hand-written YAML put `pythonPackageSpec` outside the worker
pool, ran GPU machines on a CPU image and had a multi-worker file that does not parse.

Hardware layouts, one per trainer strategy:
  one_device    one machine, no accelerator
  mirrored      one machine with N GPUs
  multi_worker  a chief pool (1 replica) plus a worker pool (workers - 1 replicas), with or without
                GPUs (MultiWorkerMirroredStrategy runs on CPU machines too, one replica each)
  tpu           one TPU VM (machine type cloud-tpu, TPU_V2 or TPU_V3 x 8)

Each pool runs a task: a ContainerSpec (an image of ours, trainer.cloud.images) by default, or a
PythonPackageSpec on one of Google's prebuilt images (`--python_package`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import yaml
from google.cloud import aiplatform_v1 as aip

from trainer.tuning.search_space import SearchSpace

# Prebuilt training images (cloud.google.com/vertex-ai/docs/training/pre-built-containers, as
# listed in late 2025): the newest TensorFlow is 2.17 for CPU and GPU, 2.15 for TPU, all Python 3.10.
PREBUILT_TF_VERSIONS = {"cpu": ("2.15", "2.16", "2.17"), "gpu": ("2.15", "2.16", "2.17"), "tpu": ("2.15",)}
PREBUILT_IMAGE_PYTHON = "3.10"
CPU_MACHINE_TYPE = "n1-standard-4"
TPU_MACHINE_TYPE = "cloud-tpu"  # TPU VMs: machine type cloud-tpu with TPU_V2 or TPU_V3 x 8
TPU_CORES = 8
STRATEGIES = ("one_device", "mirrored", "multi_worker", "tpu")
# GPUs that attach to N1 machines, and how many one machine takes (Vertex AI's custom-training
# compute table); no other general-purpose family (e2, n2, ...) takes GPUs.
N1_GPU_COUNTS = {"NVIDIA_TESLA_T4": (1, 2, 4), "NVIDIA_TESLA_P4": (1, 2, 4), "NVIDIA_TESLA_P100": (1, 2, 4),
                 "NVIDIA_TESLA_V100": (1, 2, 4, 8), "NVIDIA_TESLA_K80": (1, 2, 4, 8)}
# GPUs built into accelerator-optimized machines: machine type -> its GPU count (the first of a
# count is the default machine). Other new GPUs have no entry: they need --machine.
GPU_MACHINES = {
    "NVIDIA_TESLA_A100": {"a2-highgpu-1g": 1, "a2-highgpu-2g": 2, "a2-highgpu-4g": 4, "a2-highgpu-8g": 8,
                          "a2-megagpu-16g": 16},
    "NVIDIA_A100_80GB": {"a2-ultragpu-1g": 1, "a2-ultragpu-2g": 2, "a2-ultragpu-4g": 4, "a2-ultragpu-8g": 8},
    "NVIDIA_L4": {"g2-standard-8": 1, "g2-standard-4": 1, "g2-standard-12": 1, "g2-standard-16": 1,
                  "g2-standard-32": 1, "g2-standard-24": 2, "g2-standard-48": 4, "g2-standard-96": 8},
    "NVIDIA_H100_80GB": {"a3-highgpu-8g": 8},
}
TRAINER_MODULE = "trainer.train"

_SCALES = {"linear": aip.StudySpec.ParameterSpec.ScaleType.UNIT_LINEAR_SCALE,
           "log": aip.StudySpec.ParameterSpec.ScaleType.UNIT_LOG_SCALE}
_ALGORITHMS = {"bayesian": aip.StudySpec.Algorithm.ALGORITHM_UNSPECIFIED,  # Vertex's default is Bayesian
               "grid": aip.StudySpec.Algorithm.GRID_SEARCH,
               "random": aip.StudySpec.Algorithm.RANDOM_SEARCH}


class SpecError(ValueError):
    """The requested hardware or job does not make a valid Vertex AI spec; the message says why."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    strategy: str  # the trainer's --strategy
    machine_type: str
    accelerator_type: str | None = None  # an aip.AcceleratorType name, e.g. NVIDIA_TESLA_T4
    accelerator_count: int = 0  # per machine
    workers: int = 1  # machines in total (multi_worker: chief + workers)

    @property
    def num_replicas(self) -> int:
        """The trainer's replicas in sync: one per GPU or TPU core over all machines; 1 on CPU."""
        return max(1, self.accelerator_count) * self.workers

    @property
    def image_kind(self) -> str:
        if self.accelerator_type is None:
            return "cpu"
        return "tpu" if self.accelerator_type.startswith("TPU") else "gpu"


def parse_accelerator(text: str | None) -> tuple[str | None, int]:
    """`NVIDIA_TESLA_T4:2` -> ("NVIDIA_TESLA_T4", 2); a bare type means one; None means none."""
    if not text:
        return None, 0
    name, _, count_text = text.partition(":")
    name = name.strip().upper()
    known = [n for n in aip.AcceleratorType.__members__ if n != "ACCELERATOR_TYPE_UNSPECIFIED"]
    if name not in known:
        raise SpecError(f"unknown accelerator {name!r}; Vertex AI knows {known}")
    try:
        count = int(count_text) if count_text else 1
    except ValueError:
        raise SpecError(f"accelerator count in {text!r} must be a whole number") from None
    if count <= 0:
        raise SpecError(f"accelerator count in {text!r} must be positive")
    return name, count


def make_hardware(strategy: str, machine_type: str | None, accelerator: str | None, workers: int = 1) -> Hardware:
    """Checks that strategy, machine and accelerator agree; the message names the fix."""
    if strategy not in STRATEGIES:
        raise SpecError(f"strategy {strategy!r}: expected one of {STRATEGIES}")
    acc_type, acc_count = parse_accelerator(accelerator)
    is_tpu = acc_type is not None and acc_type.startswith("TPU")
    if strategy == "one_device":
        if acc_type is not None:
            raise SpecError(f"strategy one_device runs on CPU; drop --accelerator {accelerator} or use mirrored")
        return Hardware(strategy, machine_type or CPU_MACHINE_TYPE)
    if strategy == "tpu":
        if acc_type not in ("TPU_V2", "TPU_V3"):
            raise SpecError(f"strategy tpu needs --accelerator TPU_V2:8 or TPU_V3:8, got {accelerator!r}")
        if acc_count != TPU_CORES:
            raise SpecError(f"a TPU VM on Vertex AI has {TPU_CORES} cores; got {acc_type}:{acc_count}")
        if machine_type not in (None, TPU_MACHINE_TYPE):
            raise SpecError(f"strategy tpu runs on machine type {TPU_MACHINE_TYPE}, got {machine_type!r}")
        return Hardware(strategy, TPU_MACHINE_TYPE, acc_type, acc_count)
    if strategy == "multi_worker":
        if workers < 2:
            raise SpecError(f"strategy multi_worker needs --workers of at least 2 machines, got {workers}")
        if acc_type is None:
            return Hardware(strategy, machine_type or CPU_MACHINE_TYPE, workers=workers)
    if acc_type is None or is_tpu:
        raise SpecError(f"strategy {strategy} needs GPUs, e.g. --accelerator NVIDIA_TESLA_T4:2; got {accelerator!r}")
    machine_type = gpu_machine_type(acc_type, acc_count, machine_type)
    if strategy == "mirrored":
        return Hardware(strategy, machine_type, acc_type, acc_count)
    return Hardware(strategy, machine_type, acc_type, acc_count, workers)


def gpu_machine_type(acc_type: str, acc_count: int, machine_type: str | None) -> str:
    """The machine for `acc_count` GPUs of `acc_type` (the given one, checked, or the default);
    Vertex AI refuses a GPU on a machine family that does not take it, or an unsupported count."""
    if acc_type in N1_GPU_COUNTS:
        counts = N1_GPU_COUNTS[acc_type]
        if acc_count not in counts:
            raise SpecError(f"{acc_type}:{acc_count}: an N1 machine takes {list(counts)} of them")
        if machine_type is not None and not machine_type.startswith("n1-"):
            raise SpecError(f"{acc_type} attaches to N1 machines only (e.g. n1-standard-8), not {machine_type!r}")
        return machine_type or "n1-standard-8"
    machines = GPU_MACHINES.get(acc_type)
    if machines is None:
        if machine_type is None:
            raise SpecError(f"{acc_type} comes built into its own machine types: pass --machine")
        return machine_type
    fitting = [m for m, n in machines.items() if n == acc_count]
    if machine_type is None:
        if not fitting:
            raise SpecError(f"{acc_type}:{acc_count}: its machines hold {sorted(set(machines.values()))} GPUs")
        return fitting[0]
    if machine_type not in fitting:
        raise SpecError(f"{acc_type}:{acc_count} runs on {fitting or list(machines)}, not {machine_type!r} "
                        f"(the GPUs are built into the machine type)")
    return machine_type


def _image_host(region: str) -> str:
    """The Artifact Registry host nearest to the region (each serves the same images)."""
    for prefix in ("europe", "asia"):
        if region.startswith(prefix):
            return f"{prefix}-docker.pkg.dev"
    return "us-docker.pkg.dev"


def prebuilt_training_image(kind: str, tf_version: str, region: str = "us-central1") -> str:
    """The prebuilt TensorFlow training image for cpu, gpu or tpu and a `2.NN` version."""
    versions = PREBUILT_TF_VERSIONS.get(kind)
    if versions is None:
        raise SpecError(f"image kind {kind!r}: expected one of {sorted(PREBUILT_TF_VERSIONS)}")
    if tf_version not in versions:
        raise SpecError(f"no prebuilt TF {tf_version} training image for {kind}; available: {list(versions)}; "
                        f"or pass --executor_image with your own image")
    tag = tf_version.replace(".", "-")
    suffix = "cp310" if kind == "tpu" else "py310"  # Google's names: tf-tpu.2-15.cp310, tf-gpu.2-17.py310
    return f"{_image_host(region)}/vertex-ai/training/tf-{kind}.{tag}.{suffix}:latest"


def _machine_spec(hw: Hardware) -> aip.MachineSpec:
    if hw.accelerator_type is None:
        return aip.MachineSpec(machine_type=hw.machine_type)
    return aip.MachineSpec(machine_type=hw.machine_type, accelerator_type=hw.accelerator_type,
                           accelerator_count=hw.accelerator_count)


def container_task(image_uri: str, command: Sequence[str], args: Sequence[str]) -> aip.ContainerSpec:
    """A custom container: the image, the command that replaces its ENTRYPOINT, and the trainer's flags."""
    return aip.ContainerSpec(image_uri=image_uri, command=list(command), args=list(args))


def python_package_task(executor_image: str, package_uri: str, args: Sequence[str],
                        module: str = TRAINER_MODULE) -> aip.PythonPackageSpec:
    """The sdist pip-installed on a prebuilt image (Vertex AI accepts only its own images here)."""
    return aip.PythonPackageSpec(executor_image_uri=executor_image, package_uris=[package_uri],
                                 python_module=module, args=list(args))


def build_custom_job_spec(hw: Hardware, task: aip.ContainerSpec | aip.PythonPackageSpec,
                          base_output_dir: str) -> aip.CustomJobSpec:
    """One worker pool, or chief + workers for multi_worker (Vertex sets TF_CONFIG from the pools)."""
    field = "container_spec" if isinstance(task, aip.ContainerSpec) else "python_package_spec"
    pools = [aip.WorkerPoolSpec(machine_spec=_machine_spec(hw), replica_count=1, **{field: task})]
    if hw.workers > 1:
        pools.append(aip.WorkerPoolSpec(machine_spec=_machine_spec(hw), replica_count=hw.workers - 1,
                                        **{field: task}))
    return aip.CustomJobSpec(worker_pool_specs=pools,
                             base_output_directory=aip.GcsDestination(output_uri_prefix=base_output_dir))


def build_study_spec(space: SearchSpace) -> aip.StudySpec:
    Spec = aip.StudySpec.ParameterSpec
    params = []
    for p in space.parameters:
        if p.type == "double":
            params.append(Spec(parameter_id=p.name, scale_type=_SCALES[p.scale],
                               double_value_spec=Spec.DoubleValueSpec(min_value=p.min, max_value=p.max)))
        elif p.type == "integer":
            params.append(Spec(parameter_id=p.name, scale_type=_SCALES[p.scale],
                               integer_value_spec=Spec.IntegerValueSpec(min_value=int(p.min), max_value=int(p.max))))
        elif p.type == "discrete":
            params.append(Spec(parameter_id=p.name,
                               discrete_value_spec=Spec.DiscreteValueSpec(values=[float(v) for v in p.values])))
        else:
            params.append(Spec(parameter_id=p.name,
                               categorical_value_spec=Spec.CategoricalValueSpec(values=list(p.values))))
    goal = aip.StudySpec.MetricSpec.GoalType.MAXIMIZE if space.goal == "maximize" else \
        aip.StudySpec.MetricSpec.GoalType.MINIMIZE
    spec = aip.StudySpec(metrics=[aip.StudySpec.MetricSpec(metric_id=space.metric, goal=goal)],
                         parameters=params, algorithm=_ALGORITHMS[space.algorithm])
    if space.early_stopping:
        # Stops a trial whose reported metric trails the median of finished trials at the same step.
        spec.median_automated_stopping_spec = aip.StudySpec.MedianAutomatedStoppingSpec(use_elapsed_duration=False)
    return spec


def build_tuning_job(display_name: str, space: SearchSpace, trial_job_spec: aip.CustomJobSpec,
                     max_trials: int, parallel_trials: int, max_failed_trials: int = 0) -> aip.HyperparameterTuningJob:
    if space.algorithm == "grid" and max_trials > space.grid_size():
        max_trials = space.grid_size()  # a grid has no more points to try
    return aip.HyperparameterTuningJob(display_name=display_name, study_spec=build_study_spec(space),
                                       max_trial_count=max_trials, parallel_trial_count=parallel_trials,
                                       max_failed_trial_count=max_failed_trials, trial_job_spec=trial_job_spec)


def spec_to_dict(message) -> dict:
    """The REST/JSON form (camelCase) that gcloud's --config files use."""
    return json.loads(type(message).to_json(message, preserving_proto_field_name=False,
                                            use_integers_for_enums=False,
                                            always_print_fields_with_no_presence=False))


def spec_to_yaml(message) -> str:
    return yaml.safe_dump(spec_to_dict(message), sort_keys=False)


def spec_from_yaml(text: str, message_type):
    """Parses YAML back into `message_type`; an unknown or misplaced field is an error."""
    return message_type.from_json(json.dumps(yaml.safe_load(text)), ignore_unknown_fields=False)
