"""DreamPRM data: record formats and validation, step splitting, cached tables, batching.

    from dreamprm_jax import data
    loaded = data.load_train_records("train.jsonl", domains=["math", "sci"], on_bad_record="skip")
    print(data.format_skipped(loaded))
    table = data.build_train_dataset("train.jsonl", processor, "cache/")     # Arrow, cached
    builder = data.BatchBuilder(table, data.BatchSpec(8, (256, 512), (1024, 2048)), prepare_fn)
    sampler = data.Sampler(len(table.samples), 8, seed=0, mode="stratified",
                           groups=table.samples["domain_id"])
    batch, stats = builder.stacked_train([sampler.next() for _ in range(5)])   # TrainBatch, [T, ...]

The processor (``data.processor``) and synthetic generator (``data.synthetic``) are
imported from their own modules.
"""

from dreamprm_jax.data.batching import (
    BatchBuilder,
    BatchSpec,
    QuestionSampler,
    Sample,
    Sampler,
    choose_bucket,
    collate,
    collate_meta,
    collate_train,
    model_prepare_fn,
    power_of_two_buckets,
    stack_meta,
    stack_train,
)
from dreamprm_jax.data.dataset import PreparedData, build_meta_dataset, build_train_dataset, processor_fingerprint
from dreamprm_jax.data.records import (
    BadRecords,
    Loaded,
    MetaRecord,
    RecordError,
    TrainRecord,
    convert_trl_record,
    format_skipped,
    load_meta_records,
    load_train_records,
)
from dreamprm_jax.data.steps import StepError, find_max_step, split_step_reference, split_steps
from dreamprm_jax.data.types import MetaBatch, ModelInputs, TrainBatch

__all__ = [
    "BatchBuilder", "BatchSpec", "QuestionSampler", "Sample", "Sampler", "choose_bucket", "collate", "collate_meta", "collate_train",
    "model_prepare_fn", "power_of_two_buckets", "stack_meta", "stack_train",
    "PreparedData", "build_meta_dataset", "build_train_dataset", "processor_fingerprint",
    "BadRecords", "Loaded", "MetaRecord", "RecordError", "TrainRecord", "convert_trl_record", "format_skipped",
    "load_meta_records", "load_train_records",
    "StepError", "find_max_step", "split_step_reference", "split_steps",
    "MetaBatch", "ModelInputs", "TrainBatch",
]
