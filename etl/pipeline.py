"""The ETL pipeline: labelled images -> sharded TFRecords + metadata.json + rejects.jsonl.

    python -m etl --input all_data.csv --output out/ --form jpeg [Beam flags...]

`run(argv)` checks the flags, the input (etl.preflight), the output folder and (for embeddings)
the module before reading any input, runs the Beam pipeline into a staging folder, checks the
accounting, then publishes. `python -m etl` is etl.cli, which answers refusals before Beam loads.
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import platform
import sys
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from etl import embeddings, fixed_size_shards, inputs, preflight, progress, publish, records, sharding
from etl.options import EtlConfig
from shared import layout, metadata, schema


def make_features(config: EtlConfig, module: embeddings.ModuleInfo | None) -> tuple[schema.Feature, ...]:
    return schema.record_features(config.form, image_size=config.image_size,
                                  embedding_size=module.output_size if module else None)


def describe_preprocessing(config: EtlConfig, module: embeddings.ModuleInfo | None) -> dict:
    from shared import preprocess  # TensorFlow: loaded by the steps anyway, but not before a refusal

    if config.form == "jpeg":
        return {"stored": "original bytes of RGB JPEG inputs; other images decoded and re-encoded as RGB JPEG",
                "reencode_quality": config.jpeg_quality, "decode_with": preprocess.DESCRIPTION["decode"]}
    if config.form == "pixels":
        return dict(preprocess.DESCRIPTION, image_size=config.image_size, function="shared.preprocess.preprocess_image")
    return dict(preprocess.DESCRIPTION, module=module.handle, input_size=module.input_size,
                output_size=module.output_size, function="shared.preprocess.preprocess_image, then the module")


def _class_index(labels: list[str]) -> dict:
    return {name: i for i, name in enumerate(sorted(set(labels)))}


def load_images(config: EtlConfig) -> records.LoadImage:
    return records.LoadImage(config.form, config.split, config.max_pixels, int(config.max_file_mb * 2 ** 20),
                             config.jpeg_quality)


def make_tensor_fn(config: EtlConfig, module) -> tuple:
    """(a factory of the batched TF function that makes the payloads, images per call) for pixels or embeddings."""
    if config.form == "pixels":
        return functools.partial(records.make_pixels_fn, config.image_size), 64
    return (functools.partial(embeddings.make_embedding_fn, module.handle, module.input_size),
            config.embedding_batch_size)


def write_staged_shards(rows, class_index, config: EtlConfig, temp_dir: str, features, module, rejects: list):
    """Rows -> loaded and encoded in parallel -> records staged per bundle -> copied into shards cut
    by their sizes (`sharding`): for records of any size, each written twice. Returns shard stats."""
    loaded = (rows
              | "SpreadRowsOverWorkers" >> beam.Reshuffle()
              | "LoadAndCheckImages" >> beam.ParDo(load_images(config), beam.pvalue.AsSingleton(class_index))
              .with_outputs("rejects", main="images"))
    rejects.append(loaded.rejects)
    if config.form == "jpeg":
        encoded = loaded.images | "EncodeJpegRecords" >> beam.ParDo(records.EncodeJpeg(features))
    else:
        make_fn, size = make_tensor_fn(config, module)
        label = "ResizeToPixels" if config.form == "pixels" else "EmbedWithModule"
        tensor_records = (loaded.images
                          | "BatchImages" >> beam.BatchElements(min_batch_size=min(8, size), max_batch_size=size)
                          | label >> beam.ParDo(records.EncodeTensor(features, make_fn)).with_outputs(
                              "rejects", main="records"))
        encoded = tensor_records.records
        rejects.append(tensor_records.rejects)
    return (encoded
            | "WriteTemporaryRecords" >> beam.ParDo(sharding.WriteTempRecords(temp_dir))
            | "CollectTemporaryFiles" >> beam.combiners.ToList()
            | "PlanShardsBySize" >> beam.FlatMap(sharding.plan_shards, config.shard_bytes, config.min_shards)
            | "SpreadShardsOverWorkers" >> beam.Reshuffle()
            | "CopyRecordsIntoShards" >> beam.ParDo(sharding.CopyShard(layout.join(temp_dir, "shards"),
                                                                       publish.run_id_of(temp_dir))))


def write_fixed_size_shards(rows, class_index, config: EtlConfig, temp_dir: str, features, module, rejects: list):
    """Rows -> shards planned from the rows -> each loaded, encoded and written once by one worker
    (`fixed_size_shards`). Returns shard stats."""
    make_fn, batch_size = make_tensor_fn(config, module)
    generation = publish.run_id_of(temp_dir)
    placed = rows | "PlaceRowsBySortKey" >> beam.Map(
        fixed_size_shards.place_row, beam.pvalue.AsSingleton(class_index), config.split,
        fixed_size_shards.RecordSize(features))
    bounds = (placed
              | "CollectKeysAndSizes" >> beam.CombineGlobally(fixed_size_shards.KeysAndSizes())
              | "PlanShardsByRecordSize" >> beam.Map(fixed_size_shards.plan_bounds, config.shard_bytes,
                                                     config.min_shards))
    written = (placed
               | "KeyRowsByShard" >> beam.Map(fixed_size_shards.shard_of, beam.pvalue.AsSingleton(bounds))
               | "GroupRowsByShard" >> beam.GroupByKey()
               | "LoadEncodeAndWriteEachShardOnce" >> beam.ParDo(
                   fixed_size_shards.WriteShardOnce(features, make_fn, batch_size, load_images(config),
                                                    layout.join(temp_dir, "written")),
                   beam.pvalue.AsSingleton(class_index)).with_outputs("rejects", main="shards"))
    rejects.append(written.rejects)
    finished = (written.shards
                | "CollectWrittenShards" >> beam.combiners.ToList()
                | "KeepOrRecutShards" >> beam.FlatMap(fixed_size_shards.finish_shards, config.shard_bytes,
                                                      config.min_shards, generation).with_outputs("recut", main="kept"))
    recut = (finished.recut
             | "SpreadRecutShards" >> beam.Reshuffle()
             | "CopyRecordsIntoRecutShards" >> beam.ParDo(sharding.CopyShard(layout.join(temp_dir, "shards"), generation)))
    return (finished.kept, recut) | "AllShardStats" >> beam.Flatten()


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

    rejects = [read["rejects"]]
    if config.form in fixed_size_shards.FORMS:
        shard_stats = write_fixed_size_shards(rows, class_index, config, temp_dir, features, module, rejects)
    else:
        shard_stats = write_staged_shards(rows, class_index, config, temp_dir, features, module, rejects)
    (shard_stats
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


def make_local_runner():
    """The FnApiRunner: the DirectRunner of Beam 2.7x first tries to download its Prism runner (no
    network here), then falls back to it; go there directly (it honours --direct_num_workers)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def run(argv: Sequence[str] | None = None, checked: preflight.CheckedRun | None = None) -> metadata.DatasetMetadata:
    """Runs the ETL end to end; returns the published sidecar. Raises with a clear message on bad input
    (EtlError, publish's errors). `checked`: `preflight.check_run(argv)`, when the caller has it."""
    started = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    checked = checked or preflight.check_run(argv)
    config, class_names, folder_input = checked.config, checked.class_names, checked.folder_input
    module = None
    if config.form == "embeddings":  # fail on a bad or unreachable module before touching any input
        module = embeddings.describe_module(config.embedding_module, config.image_size)
    options = PipelineOptions(checked.beam_args)
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    local = runner in ("DirectRunner", "SwitchingDirectRunner")
    # The live count is of this process: the FnApiRunner's workers are its threads, except in
    # multi_processing mode. Elsewhere the counters are Beam metrics (the Dataflow console shows them).
    live = local and options.view_as(DirectOptions).direct_running_mode != "multi_processing"
    temp_dir, replaced = publish.prepare_output(config.output, config.overwrite)
    try:
        rows_csv = None
        if folder_input:
            folder_rows = inputs.list_class_folders(config.input)
            rows_csv = layout.join(temp_dir, "inputs.csv")
            inputs.write_rows_csv(folder_rows, rows_csv)
        features = make_features(config, module)
        logging.info("ETL %s -> %s, form %s, runner %s", config.input, config.output, config.form, runner)
        progress_log = progress.ProgressLog(config.progress_seconds if live else 0)
        with progress_log, beam.Pipeline(runner=make_local_runner() if local else None, options=options) as p:
            build_pipeline(p, config, temp_dir, features, module, class_names, rows_csv)
        staged = publish.read_staged_results(temp_dir)
        try:
            rejected = publish.check_accounting(staged, config.max_reject_fraction, config.input)
        except publish.TooManyRejectsError as e:
            if replaced or not staged["rejects"]:  # a previous dataset's own rejects.jsonl stays
                raise
            publish.write_rejects(config.output, staged["rejects"], temp_dir)  # so the user can see why
            raise publish.TooManyRejectsError(
                f"{e}. Every reject, with its reason: {layout.join(config.output, layout.REJECTS_FILE)}") from None
        names = class_names or staged["class_names"] or []
        meta = make_metadata(config, features, module, names, staged, rejected, argv, runner)
        publish.publish(config.output, temp_dir, staged["shards"], meta.to_json(), staged["rejects"])
    except BaseException:
        publish.discard(temp_dir)
        raise
    logging.info("Wrote %s", config.output)
    for line in progress.summary_lines(meta, time.time() - started, progress_log.first_record_after(started)):
        logging.info("  %s", line)
    return meta
