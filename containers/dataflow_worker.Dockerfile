# The Dataflow worker image: Beam's Python 3.11 SDK image at the launcher's Beam version, with the ETL's
# dependencies (setup.py's base and etl extra, TensorFlow included) and the etl and shared packages,
# so workers start without pip-installing anything. Use it with
#   make etl RUNNER=DataflowRunner WORKER_IMAGE=<its address> ...
# (--sdk_container_image; without WORKER_IMAGE, workers install the package from --setup_file).
# From the repository root (`make image` passes the installed Beam version):
#   docker build -f containers/dataflow_worker.Dockerfile --build-arg BEAM_VERSION=2.77.0 -t imagepipe-dataflow-worker .
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION}
ARG BEAM_VERSION
WORKDIR /opt/imagepipe
COPY setup.py ./
COPY shared shared
COPY etl etl
# The SDK image's Beam stays: Dataflow needs the workers' SDK at the launcher's exact version.
RUN echo "apache-beam==${BEAM_VERSION}" > /tmp/beam.txt \
 && pip install --no-cache-dir --constraint /tmp/beam.txt ".[etl]" \
 && rm /tmp/beam.txt
# The ENTRYPOINT stays the SDK image's /opt/apache/beam/boot, which starts the worker.
