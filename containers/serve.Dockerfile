# The serving image: `python -m trainer.serve` with the serving extra, for Vertex AI's custom-container
# contract: Vertex sets AIP_HTTP_PORT (8080), AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE and AIP_STORAGE_URI
# (the model's copy in Cloud Storage), and the server listens and answers there. From the repository root:
#   docker build -f containers/serve.Dockerfile -t imagepipe-serve .
# Built on our server rather than TF Serving's image: the same request checks (image formats, pixel and
# body limits) as `make serve`, the TensorFlow the model was trained with (TF Serving's releases trail
# TF's, and a newer SavedModel may use ops an older server lacks), and no version-folder layout.
FROM python:3.11-slim-bookworm
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
WORKDIR /opt/imagepipe
COPY setup.py ./
COPY shared shared
COPY trainer trainer
RUN pip install --no-cache-dir ".[serving]"
EXPOSE 8080
ENTRYPOINT ["python", "-m", "trainer.serve"]
