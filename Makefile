# Every target installs what it needs into .venv on first use (a fresh machine needs only python3.11).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# One stamp per setup.py extra: each target installs the roles it runs (`make serve` needs no Beam).
INSTALLED = $(foreach extra,$(1),$(VENV)/.installed-$(extra))
STAMP := $(call INSTALLED,dev)
export TF_CPP_MIN_LOG_LEVEL ?= 2

# The embedded sample (scikit-learn's digits) and where its outputs go.
SAMPLE_DIR ?= data/sample/digits
INPUT ?= $(SAMPLE_DIR)/all_data.csv
# The class list that fixes the class order (LABELS, its old name, still works).
CLASS_NAMES_FILE ?= $(or $(LABELS),$(if $(findstring $(SAMPLE_DIR),$(INPUT)),$(SAMPLE_DIR)/dict.txt,))
FORM ?= pixels
OUTPUT ?= data/out/$(FORM)
RUNNER ?= DirectRunner
IMAGE_SIZE ?= 32
EMBEDDING_MODULE ?=
ETL_FLAGS ?=
# Dataflow (RUNNER=DataflowRunner): PROJECT, REGION, BUCKET required; INPUT and OUTPUT on gs://.
PROJECT ?=
REGION ?=
BUCKET ?=
JOB_NAME ?=
MAX_WORKERS ?= 10
WORKER_MACHINE ?=
# The Dataflow workers' image (`make push` pushes one: the dataflow-worker address below); empty:
# workers pip-install the package from setup.py when they start.
WORKER_IMAGE ?=

# Training on the ETL output. The sample's digits are 8x8 strokes: no flips or crops.
DATA ?= $(OUTPUT)
# The ETL runs first only for the default DATA: a DATA given (and mistyped) is the trainer's
# error to name, not a reason to rebuild data/out/$(FORM).
AUTO_ETL = $(if $(filter file,$(origin DATA)),test -f $(DATA)/metadata.json || $(MAKE) etl,)
# The model's input size for the jpeg form (pixels and embeddings take theirs from the sidecar):
# the ETL's IMAGE_SIZE, except that MobileNet wants the 224 px its module was trained at.
TRAIN_IMAGE_SIZE ?= $(if $(filter mobilenet,$(MODEL)),224,$(IMAGE_SIZE))
JOB_DIR ?= runs/$(FORM)
STRATEGY ?= auto
MODEL ?= dnn
EPOCHS ?= 20
# The sample's own flags only when training on the sample's ETL output (not on a DATA given).
ON_SAMPLE = $(and $(findstring $(SAMPLE_DIR),$(INPUT)),$(filter file,$(origin DATA)))
TRAIN_FLAGS ?= $(if $(ON_SAMPLE),--num_hidden 128 --crop_ratio 1.0 --with_flip false --with_color_distort false,)

# Serving the last `make train`: it writes its JOB_DIR to LAST_TRAIN, which `serve` and `bench-serve`
# read unless JOB_DIR or EXPORT is given (`make demo` trains runs/demo, not runs/$(FORM)).
LAST_TRAIN ?= runs/LAST_TRAIN
EXPORT ?= $(if $(filter file,$(origin JOB_DIR)),$(or $(shell cat $(LAST_TRAIN) 2>/dev/null),$(JOB_DIR)),$(JOB_DIR))/export
SERVE_FLAGS ?=

# Local tuning on the ETL output.
TRIALS ?= 8
PARALLEL ?= 2
SEARCH_SPACE ?=
TUNE_DIR ?= runs/tune-$(FORM)
TUNE_FLAGS ?= --num_epochs 5 --image_size $(TRAIN_IMAGE_SIZE) $(if $(ON_SAMPLE),--with_flip false,)

# Images (containers/, trainer.cloud.images): local names (imagepipe-train:VERSION) without PROJECT,
# Artifact Registry addresses (REGION-docker.pkg.dev/PROJECT/IMAGE_REPO/...) with PROJECT and REGION,
# which trainer.cloud train|tune|deploy use by default.
IMAGE_REPO ?= imagepipe
IMAGE_TAG ?=
image_uri = $(shell $(PY) -m trainer.cloud.images uri --kind $(1) --project "$(PROJECT)" --region "$(REGION)" --repository "$(IMAGE_REPO)" --tag "$(IMAGE_TAG)")
image_build_args = $(shell $(PY) -m trainer.cloud.images build-args --kind $(1))

.PHONY: help install sample etl train serve tune demo test bench-etl bench-corpus bench-ingest bench-serve \
	bench-vectorise bench-strategies clean image push registry-given

help:
	@echo "make demo        - install, make the sample, ETL -> train -> export -> predict, end to end"
	@echo "make test        - install, run the tests"
	@echo "make etl FORM=jpeg|pixels|embeddings [INPUT= CLASS_NAMES_FILE= OUTPUT= RUNNER= IMAGE_SIZE= EMBEDDING_MODULE= ETL_FLAGS=]"
	@echo "make etl RUNNER=DataflowRunner PROJECT= REGION= BUCKET= INPUT=gs://... OUTPUT=gs://... [JOB_NAME= MAX_WORKERS= WORKER_MACHINE= WORKER_IMAGE=]"
	@echo "make train [STRATEGY=auto|one_device|mirrored|multi_worker|tpu MODEL=linear|dnn|mobilenet DATA= JOB_DIR= EPOCHS= TRAIN_IMAGE_SIZE= TRAIN_FLAGS=]"
	@echo "make serve       - serve the last 'make train' export on 127.0.0.1:8501 (TF Serving's REST API)"
	@echo "make tune [DATA= TRIALS= PARALLEL= SEARCH_SPACE= TUNE_DIR= TUNE_FLAGS=]"
	@echo "make bench-etl | bench-ingest | bench-serve - throughput against this machine's limits"
	@echo "make bench-vectorise | bench-strategies [DATA= MODEL= TRAIN_IMAGE_SIZE= TRAIN_FLAGS= BENCH_FLAGS=] - chapter 7's tables on DATA"
	@echo "make bench-corpus - the benchmark's photo corpus in data/out/bench-jpeg (jpeg form, 8 train shards)"
	@echo "make image [PROJECT= REGION= IMAGE_REPO= IMAGE_TAG=] - docker build the training (CPU, GPU), serving and Dataflow worker images"
	@echo "make push PROJECT= REGION= [IMAGE_REPO= IMAGE_TAG=]     - and push them to Artifact Registry (no Docker: python -m trainer.cloud build)"

install: $(STAMP)

$(VENV)/.created:
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-%: setup.py | $(VENV)/.created
	$(VENV)/bin/pip install --quiet -e '.[$*]'
	touch $@

$(SAMPLE_DIR)/all_data.csv: | $(call INSTALLED,sample)
	$(PY) -m etl.sample --output $(SAMPLE_DIR)

sample: $(SAMPLE_DIR)/all_data.csv

etl: $(call INSTALLED,etl) $(if $(findstring $(SAMPLE_DIR),$(INPUT)),sample,)
	@set -eo pipefail; \
	if [ "$(RUNNER)" = DataflowRunner ]; then \
	  runner_flags=$$($(PY) -m etl.dataflow_options --project "$(PROJECT)" --region "$(REGION)" \
	      --bucket "$(BUCKET)" --job_name "$(JOB_NAME)" --max_workers "$(MAX_WORKERS)" \
	      --machine_type "$(WORKER_MACHINE)" --worker_image "$(WORKER_IMAGE)" --input "$(INPUT)" --output "$(OUTPUT)"); \
	else runner_flags="--runner $(RUNNER)"; fi; \
	eval "set -- $$runner_flags"; set -x; \
	$(PY) -m etl --input $(INPUT) $(if $(CLASS_NAMES_FILE),--class_names_file $(CLASS_NAMES_FILE),) --output $(OUTPUT) --form $(FORM) \
	    --image_size $(IMAGE_SIZE) $(if $(EMBEDDING_MODULE),--embedding_module $(EMBEDDING_MODULE),) \
	    "$$@" --overwrite $(ETL_FLAGS)

train: $(call INSTALLED,training)
	$(AUTO_ETL)
	$(PY) -m trainer.train --data $(DATA) --job_dir $(JOB_DIR) --strategy $(STRATEGY) --model $(MODEL) \
	    --num_epochs $(EPOCHS) --image_size $(TRAIN_IMAGE_SIZE) $(TRAIN_FLAGS)
	mkdir -p $(dir $(LAST_TRAIN)) && echo '$(JOB_DIR)' > $(LAST_TRAIN)

serve: $(call INSTALLED,serving)
	@test -f $(EXPORT)/saved_model.pb || { echo "no export at $(EXPORT): run 'make train' first, or pass EXPORT=..."; exit 1; }
	$(PY) -m trainer.serve --model $(EXPORT) $(SERVE_FLAGS)

tune: $(call INSTALLED,tuning)
	$(AUTO_ETL)
	$(PY) -m trainer.tune --data $(DATA) --job_dir $(TUNE_DIR) $(if $(SEARCH_SPACE),--search_space $(SEARCH_SPACE),) \
	    --max_trials $(TRIALS) --parallel_trials $(PARALLEL) $(TUNE_FLAGS)

# The main job end to end on the sample: ETL (pixels, 32 px) -> train -> export -> predict.
demo: sample $(call INSTALLED,etl training serving)
	$(MAKE) etl FORM=pixels
	rm -rf runs/demo
	$(MAKE) train FORM=pixels JOB_DIR=runs/demo
	$(PY) -m trainer.predict --model runs/demo/export --grid runs/demo/predictions.png \
	    $$(for d in $(SAMPLE_DIR)/*/; do ls $$d*.jpg | tail -1; done)
	@echo "demo: dataset in data/out/pixels; run in runs/demo: metrics.json, training_curves.png, predictions.png, export/"

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-etl: $(call INSTALLED,etl bench)
	$(PY) -m etl.bench

# The benchmarks' corpus: the jpeg form of photo-like images (the ETL benchmark's), in 8 shards so
# that interleaving has files to interleave.
BENCH_CORPUS := data/out/bench-jpeg
bench-corpus: $(call INSTALLED,etl bench)
	test -f $(BENCH_CORPUS)/metadata.json || { \
	  $(PY) -c "from etl.bench import write_corpus; write_corpus('data/bench/photos', 1200)" && \
	  $(PY) -m etl --input data/bench/photos --output $(BENCH_CORPUS) --form jpeg --min_shards 8 --overwrite; }

bench-ingest: bench-corpus $(call INSTALLED,training bench)
	$(PY) -m trainer.bench_ingest --data $(BENCH_CORPUS)

# Chapter 7's grayscale table (7-5) and colour-distortion placement, then its strategy timings, on DATA
# (the sample's ETL output by default; `make bench-corpus` then DATA=data/out/bench-jpeg for photos).
BENCH_FLAGS ?=
bench-vectorise: $(call INSTALLED,training)
	$(AUTO_ETL)
	$(PY) -m trainer.bench_vectorise --data $(DATA) --image_size $(TRAIN_IMAGE_SIZE) $(BENCH_FLAGS)

bench-strategies: $(call INSTALLED,training)
	$(AUTO_ETL)
	$(PY) -m trainer.bench_strategies --data $(DATA) --model $(MODEL) --image_size $(TRAIN_IMAGE_SIZE) $(TRAIN_FLAGS) \
	    $(BENCH_FLAGS)

bench-serve: $(call INSTALLED,serving bench)
	@test -f $(EXPORT)/saved_model.pb || { echo "no export at $(EXPORT): run 'make train' first, or pass EXPORT=..."; exit 1; }
	$(PY) -m trainer.serving.bench --model $(EXPORT)

# The build context is the repository root (.dockerignore keeps data, runs and .venv out).
image: $(call INSTALLED,cloud etl)
	docker build $(call image_build_args,train) -t $(call image_uri,train) .
	docker build $(call image_build_args,train-gpu) -t $(call image_uri,train-gpu) .
	docker build $(call image_build_args,serve) -t $(call image_uri,serve) .
	docker build $(call image_build_args,dataflow-worker) -t $(call image_uri,dataflow-worker) .

# Once per project: gcloud artifacts repositories create $(IMAGE_REPO) --repository-format=docker
# --location=REGION, and gcloud auth configure-docker REGION-docker.pkg.dev.
push: registry-given image
	docker push $(call image_uri,train)
	docker push $(call image_uri,train-gpu)
	docker push $(call image_uri,serve)
	docker push $(call image_uri,dataflow-worker)

registry-given:
	@test -n "$(PROJECT)" -a -n "$(REGION)" || { echo "make push needs PROJECT and REGION (it pushes to REGION-docker.pkg.dev/PROJECT/$(IMAGE_REPO))"; exit 1; }

clean:
	rm -rf data/out data/bench runs .pytest_cache
