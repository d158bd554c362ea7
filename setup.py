"""Installs the `etl`, `shared` and `trainer` packages.

It doubles as Beam's `--setup_file`: Dataflow workers run `pip install .` on this
file, so they get the same record schema and preprocessing as the local runner.
"""
import setuptools

# Compatible ranges, not exact pins: a user's environment may carry newer patch releases.
# TF and tf_keras move together (tf_keras 2.N pairs with TF 2.N).
REQUIRED = [
    "apache-beam[gcp]>=2.70,<3",
    "tensorflow>=2.21,<2.22",
    "tf-keras>=2.21,<2.22",
    "tensorflow-hub>=0.16.1,<0.17",
    # TF 2.21 no longer pulls it in, and without it tf.summary (the TensorBoard callback) fails.
    "tensorboard>=2.20,<3",
    "numpy>=1.26,<3",
    "pillow>=10,<14",
    "matplotlib>=3.8,<4",
    "pyyaml>=6,<7",
    # Local REST server (trainer.serve): a well-kept ASGI framework and server. Starlette, not FastAPI
    # on top of it: its extra layers cost 0.2-0.3 ms a request and this app uses none of them.
    "starlette>=0.37,<2",
    "uvicorn>=0.29,<1",
    # uvicorn uses these when present: single-image requests 332 -> 449 per second on 2 cores.
    "httptools>=0.6,<1",
    "uvloop>=0.19,<1; sys_platform != 'win32'",
    # Request parsing in C: a 32-image request's base64 2.5 ms -> 0.07 ms, its JSON 0.61 -> 0.30 ms.
    "orjson>=3.9,<4",
    "pybase64>=1.3,<2",
    # Local hyperparameter search (trainer.tune) and Vertex AI's metric reporting and job specs.
    "optuna>=3.6,<6",
    "cloudml-hypertune==0.1.0.dev6",
    "google-cloud-aiplatform>=1.60,<2",
]

EXTRAS = {
    # `make sample` (scikit-learn's bundled digits) and the ETL benchmark corpus
    # (scikit-image's bundled photographs): both ship their data, nothing is downloaded.
    "sample": ["scikit-learn>=1.4,<2", "scikit-image>=0.22,<1"],
    "dev": ["pytest>=8,<10", "httpx>=0.27,<1", "scikit-learn>=1.4,<2", "scikit-image>=0.22,<1"],
}

setuptools.setup(
    name="imagepipe",
    version="0.1.0",
    description="Labelled images to sharded TFRecords (Beam) and a tf.distribute trainer (tf_keras).",
    python_requires=">=3.11,<3.13",
    packages=setuptools.find_packages(include=["etl", "etl.*", "shared", "shared.*", "trainer", "trainer.*"]),
    install_requires=REQUIRED,
    extras_require=EXTRAS,
)
