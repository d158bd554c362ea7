"""Installs the `etl`, `shared` and `trainer` packages, with one extra per role:

    pip install '.[etl]'        the Beam ETL (DirectRunner or Dataflow launcher)
    pip install '.[training]'   python -m trainer.train (what a Vertex AI training image needs)
    pip install '.[serving]'    python -m trainer.serve and trainer.predict (a serving image)
    pip install '.[tuning]'     python -m trainer.tune (trials run the trainer: training included)
    pip install '.[cloud]'      python -m trainer.cloud (images, job specs, local runs, deployment)
    pip install '.[dev]'        everything, plus the test tools (`make test`)

The base requirements are what every role that reads records or runs a model imports (shared/).
They are also what Dataflow workers get from `--setup_file`, which installs no extras: Beam itself
comes with their SDK image, and the embeddings form needs tensorflow-hub there.
tests/test_packaging.py checks that each role's modules import only what its extra installs.
"""
import setuptools

# Compatible ranges, not exact pins: a user's environment may carry newer patch releases.
# TF and tf_keras move together (tf_keras 2.N pairs with TF 2.N); tensorflow-hub pulls tf_keras in,
# so the pin lives in the base to keep the pair matched wherever hub is installed.
BASE = [
    "tensorflow>=2.21,<2.22",
    "tf-keras>=2.21,<2.22",
    "tensorflow-hub>=0.16.1,<0.17",
    "numpy>=1.26,<3",
    "pillow>=10,<14",
]

ETL = [
    "apache-beam[gcp]>=2.70,<3",
    "google-crc32c>=1.5,<2",  # TFRecord framing (etl/tfrecord_io.py); Beam[gcp] brings it too
]

TRAINING = [
    # TF 2.21 no longer pulls it in, and without it tf.summary (the TensorBoard callback) fails.
    "tensorboard>=2.20,<3",
    "matplotlib>=3.8,<4",  # training curves
    "cloudml-hypertune==0.1.0.dev6",  # reports the trial metric inside a Vertex AI tuning trial
]

SERVING = [
    # A well-kept ASGI framework and server; starlette, not FastAPI on top of it (docs/serving.md).
    "starlette>=0.37,<2",
    "uvicorn>=0.29,<1",
    # uvicorn uses these when present (faster HTTP parsing and event loop).
    "httptools>=0.6,<1",
    "uvloop>=0.19,<1; sys_platform != 'win32'",
    # Request parsing in C (base64 and JSON of a 32-image request ~10x faster than the stdlib's).
    "orjson>=3.9,<4",
    "pybase64>=1.3,<2",
    "matplotlib>=3.8,<4",  # trainer.predict --grid
    # The server measures its own memory at start to state its bound (trainer.serving.resources).
    "psutil>=5.9,<8",
]

TUNING = TRAINING + [
    "optuna>=4.9,<6",  # RetryHeartbeatStaleTrialCallback
    "pyyaml>=6,<7",  # the search-space file, shared with Vertex AI tuning
]

# Building and submitting specs needs only the SDK; a --local_run of a job runs the trainer here,
# and `deploy` makes the serving copy with the base requirements (trainer.bytes_only_export).
CLOUD = TRAINING + [
    "google-cloud-aiplatform>=1.60,<2",
    "google-cloud-storage>=2.10,<4",  # uploads: the sdist (--python_package), a local export's serving copy
    "google-auth>=2.14,<3",  # `predict`'s bearer token for an endpoint
    "pyyaml>=6,<7",
    "packaging>=23",
]

# `make sample` (scikit-learn's bundled digits) and the benchmark corpus (scikit-image's bundled
# photographs): both ship their data, nothing is downloaded.
SAMPLE = ["scikit-learn>=1.4,<2", "scikit-image>=0.22,<1"]

# Benchmarks only: peers measured against, and their load generators. Never imported at run time.
BENCH = SAMPLE + [
    "httpx>=0.27,<1",
    "psutil>=5.9,<8",  # the processes' CPU and memory
    # trainer.bench_ingest's peer row; 4.9.10 installs beside TF 2.21 and protobuf 6 and builds offline.
    "tensorflow-datasets>=4.9.9,<5",
    "importlib-resources>=6,<8",  # TFDS imports it but requires it only below Python 3.9 (tensorflow/datasets#11212)
]

TEST = [
    "pytest>=8,<10",
    "httpx>=0.27,<1",
    "psutil>=5.9,<8",
    "gcp-storage-emulator>=2026.7.19,<2027",  # a local Cloud Storage for the gs:// ETL tests (tests/gcs_emulator.py)
]

EXTRAS = {
    "etl": ETL,
    "training": TRAINING,
    "serving": SERVING,
    "tuning": TUNING,
    "cloud": CLOUD,
    "sample": SAMPLE,
    "bench": BENCH,
}
EXTRAS["dev"] = sorted({req for reqs in EXTRAS.values() for req in reqs} | set(TEST))

setuptools.setup(
    name="imagepipe",
    version="0.1.0",
    description="Labelled images to sharded TFRecords (Beam) and a tf.distribute trainer (tf_keras).",
    python_requires=">=3.11,<3.13",
    packages=setuptools.find_packages(include=["etl", "etl.*", "shared", "shared.*", "trainer", "trainer.*"]),
    install_requires=BASE,
    extras_require=EXTRAS,
)
