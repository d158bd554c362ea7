# The training image: `python -m trainer.train` with the package's training extra (setup.py), which
# Vertex AI runs as a custom container (trainer.cloud builds the job spec). From the repository root:
#   docker build -f containers/train.Dockerfile -t imagepipe-train .
#   docker build -f containers/train.Dockerfile --build-arg VARIANT=gpu -t imagepipe-train-gpu .
# (`make image` builds both; tests/test_containers.py checks this file against setup.py.)
ARG VARIANT=cpu

FROM python:3.11-slim-bookworm AS base-cpu
RUN python -m venv /opt/venv

# GPU: a CUDA base for the driver plumbing (NVIDIA_* variables, the host driver on LD_LIBRARY_PATH),
# and the CUDA and cuDNN libraries TF was built with from pip: TF's install guide for Linux GPUs is
# `pip install 'tensorflow[and-cuda]'` (CUDA 12.5 and cuDNN 9 wheels for TF 2.21, found through
# TF's RUNPATH). Ubuntu 22.04's universe has Python 3.11.
FROM nvidia/cuda:12.5.1-base-ubuntu22.04 AS base-gpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "tensorflow[and-cuda]>=2.21,<2.22"

FROM base-${VARIANT}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
WORKDIR /opt/imagepipe
COPY setup.py ./
COPY shared shared
COPY trainer trainer
RUN pip install --no-cache-dir ".[training]"
ENTRYPOINT ["python", "-m", "trainer.train"]
