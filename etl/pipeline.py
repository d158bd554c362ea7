"""The ETL pipeline: labelled images -> sharded TFRecords + metadata.json + rejects.jsonl.

    python -m etl --input all_data.csv --output out/ --form jpeg [Beam flags...]

`run(argv)` checks the output folder and (for embeddings) the module before reading any
input, runs the Beam pipeline into a staging folder, checks the accounting, then publishes.
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import platform
import sys
from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from etl import embeddings, inputs, publish, records, sharding
from etl.options import EtlConfig, parse_etl_args
from shared import layout, metadata, preprocess, schema
from shared.paths import is_remote


def make_features(config: EtlConfig, module: embeddings.ModuleInfo | None) -> tuple[schema.Feature, ...]:
    return schema.record_features(config.form, image_size=config.image_size,
                                  embedding_size=module.output_size if module else None)


def describe_preprocessing(config: EtlConfig, module: embeddings.ModuleInfo | None) -> dict:
    if config.form == "jpeg":
        return {"stored": "original bytes of RGB JPEG inputs; other images decoded and re-encoded as RGB JPEG",
                "reencode_quality": config.jpeg_quality, "decode_with": preprocess.DESCRIPTION["decode"]}
    if config.form == "pixels":
        return dict(preprocess.DESCRIPTION, image_size=config.image_size, function="shared.preprocess.preprocess_image")
    return dict(preprocess.DESCRIPTION, module=module.handle, input_size=module.input_size,
                output_size=module.output_size, function="shared.preprocess.preprocess_image, then the module")


def _class_index(labels: list[str]) -> dict:
    return {name: i for i, name in enumerate(sorted(set(labels)))}


def build_pipeline(p: beam.Pipeline, config: EtlConfig, temp_dir: str, features, module, class_names=None,
                   rows_csv: str | None = None) -> None:
    """Wires the pipeline. Every step writes into `temp_dir`; nothing touches the output folder."""
    read = p | "ReadLabelledRows" >> inputs.ReadLabelledRows(config.input, rows_csv, class_names)
    rows = read["rows"]
    if class_names is not None:
        class_index = p | "ClassesFromLabelsFile" >> beam.Create([{n: i for i, n in enumerate(class_names)}])
    else:
        class_index = (rows
                       | "TakeLabels" >> beam.Map(lambda r: r.label)
                       | "DistinctLabels" >> beam.Distinct()
                       | "CollectLabels" >> beam.combiners.ToList()
                       | "IndexSortedLabels" >> beam.Map(_class_index))
    (class_index
     | "ClassNamesAsJson" >> beam.Map(lambda index: json.dumps(sorted(index, key=index.get), ensure_ascii=False))
     | "WriteClassNames" >> beam.io.WriteToText(layout.join(temp_dir, "class_names"), ".json"))
    (read["num_rows"]
     | "RowCountAsText" >> beam.Map(str)
     | "WriteRowCount" >> beam.io.WriteToText(layout.join(temp_dir, "num_rows"), ".txt"))

    loaded = (rows
              | "SpreadRowsOverWorkers" >> beam.Reshuffle()
              | "LoadAndCheckImages" >> beam.ParDo(
                  records.LoadImage(config.form, config.split, config.max_pixels,
                                    int(config.max_file_mb * 2 ** 20), config.jpeg_quality),
                  beam.pvalue.AsSingleton(class_index)).with_outputs("rejects", main="images"))
    rejects = [read["rejects"], loaded.rejects]
    if config.form == "jpeg":
        encoded = loaded.images | "EncodeJpegRecords" >> beam.ParDo(records.EncodeJpeg(features))
    else:
        if config.form == "pixels":
            make_fn, label, size = functools.partial(records.make_pixels_fn, config.image_size), "ResizeToPixels", 64
        else:
            make_fn = functools.partial(embeddings.make_embedding_fn, module.handle, module.input_size)
            label, size = "EmbedWithModule", config.embedding_batch_size
        tensor_records = (loaded.images
                          | "BatchImages" >> beam.BatchElements(min_batch_size=min(8, size), max_batch_size=size)
                          | label >> beam.ParDo(records.EncodeTensor(features, make_fn)).with_outputs(
                              "rejects", main="records"))
        encoded = tensor_records.records
        rejects.append(tensor_records.rejects)

    (encoded
     | "WriteTemporaryRecords" >> beam.ParDo(sharding.WriteTempRecords(temp_dir))
     | "CollectTemporaryFiles" >> beam.combiners.ToList()
     | "PlanShardsBySize" >> beam.FlatMap(sharding.plan_shards, config.shard_bytes, config.min_shards)
     | "SpreadShardsOverWorkers" >> beam.Reshuffle()
     | "CopyRecordsIntoShards" >> beam.ParDo(sharding.CopyShard(layout.join(temp_dir, "shards")))
     | "ShardStatsAsJson" >> beam.Map(json.dumps)
     | "WriteShardStats" >> beam.io.WriteToText(layout.join(temp_dir, "shards"), ".jsonl"))
    (rejects
     | "MergeRejects" >> beam.Flatten()
     | "RejectsAsJson" >> beam.Map(lambda r: json.dumps(r, ensure_ascii=False))
     | "WriteRejects" >> beam.io.WriteToText(layout.join(temp_dir, "rejects"), ".jsonl"))


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("imagepipe", "apache-beam", "tensorflow", "tensorflow-hub", "numpy", "pillow"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    return out


def make_metadata(config: EtlConfig, features, module, class_names, staged: dict, rejected: dict,
                  argv: Sequence[str], runner: str) -> metadata.DatasetMetadata:
    splits = {}
    for split in layout.SPLITS:
        stats = sorted((s for s in staged["shards"] if s["split"] == split), key=lambda s: s["index"])
        shards = tuple(metadata.ShardInfo(s["file"], s["num_examples"], s["num_bytes"], s["sha256"]) for s in stats)
        splits[split] = metadata.SplitInfo(sum(s.num_examples for s in shards), shards)
    extra = {
        "rejected": rejected,
        "input": {"path": config.input, "class_names_file": config.class_names_file, "num_rows": staged["num_rows"]},
        "etl_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "command_line": ["python", "-m", "etl", *argv],
        "runner": runner,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return metadata.DatasetMetadata(schema.SCHEMA_VERSION, config.form, tuple(class_names), features,
                                    describe_preprocessing(config, module), splits, extra)


def _lies_under(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it, as written or (local paths) with their links resolved."""
    def nests(path: str, folder: str) -> bool:
        return (path.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")

    if is_remote(path) or is_remote(folder):
        return nests(path, folder)
    # Both: the listing follows links, so "images/out" (a link to /elsewhere) is listed, and an
    # --input reached through a link ("data" -> /mnt/d/data) holds its target's folders.
    return (nests(os.path.abspath(path), os.path.abspath(folder))
            or nests(os.path.realpath(path), os.path.realpath(folder)))


def run(argv: Sequence[str] | None = None) -> metadata.DatasetMetadata:
    """Runs the ETL end to end; returns the published sidecar. Raises with a clear message on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, beam_args = parse_etl_args(argv)
    module = None
    if config.form == "embeddings":  # fail on a bad or unreachable module before touching any input
        module = embeddings.describe_module(config.embedding_module, config.image_size)
    class_names = inputs.read_labels_file(config.class_names_file) if config.class_names_file else None
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    # The DirectRunner of Beam 2.7x first tries to download its Prism runner (no network here),
    # then falls back to the FnApiRunner; go there directly (it honours --direct_num_workers).
    local_runner = FnApiRunner() if runner in ("DirectRunner", "SwitchingDirectRunner") else None
    folder_input = inputs.is_folder_input(config.input)
    if folder_input and _lies_under(config.output, config.input):
        # Its shards, sidecar and rejects would be listed as images of a class named after the
        # output folder on the next run (`make etl` always passes --overwrite): a class with no
        # records, shifting the indices of the classes sorted after it.
        raise ValueError(f"--output {config.output} lies inside the class-folder --input {config.input}; "
                         "choose an output folder outside it")
    temp_dir, replaced = publish.prepare_output(config.output, config.overwrite)
    try:
        rows_csv = None
        if folder_input:
            folder_rows = inputs.list_class_folders(config.input)
            rows_csv = layout.join(temp_dir, "inputs.csv")
            inputs.write_rows_csv(folder_rows, rows_csv)
        features = make_features(config, module)
        logging.info("ETL %s -> %s, form %s, runner %s", config.input, config.output, config.form, runner)
        with beam.Pipeline(runner=local_runner, options=options) as p:
            build_pipeline(p, config, temp_dir, features, module, class_names, rows_csv)
        staged = publish.read_staged_results(temp_dir)
        try:
            rejected = publish.check_accounting(staged, config.max_reject_fraction, config.input)
        except publish.TooManyRejectsError as e:
            if replaced or not staged["rejects"]:  # a previous dataset's own rejects.jsonl stays
                raise
            publish.write_rejects(config.output, staged["rejects"])  # so the user can see why
            raise publish.TooManyRejectsError(
                f"{e}. Every reject, with its reason: {layout.join(config.output, layout.REJECTS_FILE)}") from None
        names = class_names or staged["class_names"] or []
        meta = make_metadata(config, features, module, names, staged, rejected, argv, runner)
        publish.publish(config.output, temp_dir, [s["file"] for s in staged["shards"]], meta.to_json(),
                        staged["rejects"], replaced)
    except BaseException:
        publish.discard(temp_dir)
        raise
    logging.info("Wrote %s: %s", config.output,
                 {s: meta.splits[s].num_examples for s in layout.SPLITS} | {"rejected": rejected["count"]})
    return meta


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        meta = run()
    except (publish.OutputNotEmptyError, publish.TooManyRejectsError, embeddings.EmbeddingModuleError,
            ValueError, FileNotFoundError) as e:
        print(f"etl: error: {e}", file=sys.stderr)
        sys.exit(2)
    counts = ", ".join(f"{s}={meta.splits[s].num_examples}" for s in layout.SPLITS)
    print(f"etl: wrote {counts}, rejected={meta.extra['rejected']['count']}")
