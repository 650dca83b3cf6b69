"""train/data.py and train/metrics.py: task registry, loading, validation errors, tokenization, metrics."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

# train/ is a folder of scripts beside the package, not installed: import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import data as data_module  # noqa: E402
from train.data import (  # noqa: E402
    GLUE_TASKS,
    LOCAL_TASK,
    OFFLINE_TASK,
    TASKS,
    load_task_data,
    read_tweets,
    resolve_task,
    tokenize_task_data,
)
from train.metrics import compute_metrics, is_better  # noqa: E402

# name: (text columns, num_labels, main metric, is_regression, dev split)
GLUE_EXPECTED = {
    "cola": (("sentence",), 2, "matthews_correlation", False, "validation"),
    "sst2": (("sentence",), 2, "accuracy", False, "validation"),
    "mrpc": (("sentence1", "sentence2"), 2, "f1", False, "validation"),
    "qqp": (("question1", "question2"), 2, "f1", False, "validation"),
    "stsb": (("sentence1", "sentence2"), 1, "spearman", True, "validation"),
    "mnli": (("premise", "hypothesis"), 3, "accuracy", False, "validation_matched"),
    "qnli": (("question", "sentence"), 2, "accuracy", False, "validation"),
    "rte": (("sentence1", "sentence2"), 2, "accuracy", False, "validation"),
    "wnli": (("sentence1", "sentence2"), 2, "accuracy", False, "validation"),
}


def write_csv(path, rows, fieldnames=None, delimiter=","):
    fieldnames = fieldnames or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def sentiment_rows(count, labels=("neg", "pos")):
    return [{"sentence": f"example number {i}", "label": labels[i % len(labels)]} for i in range(count)]


@pytest.fixture
def csv_pair(tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(10))
    dev = write_csv(tmp_path / "dev.csv", sentiment_rows(5))
    return train, dev


# ---- registry ----


@pytest.mark.parametrize("name", sorted(GLUE_EXPECTED))
def test_glue_registry(name):
    spec = GLUE_TASKS[name]
    columns, num_labels, main_metric, is_regression, split = GLUE_EXPECTED[name]
    assert (spec.text_columns, spec.num_labels, spec.main_metric, spec.is_regression, spec.validation_split) == (
        columns, num_labels, main_metric, is_regression, split
    )
    assert spec.main_metric in spec.metrics
    assert (spec.label_names is None) == is_regression
    if not is_regression:
        assert len(spec.label_names) == num_labels


def test_registry_holds_glue_and_offline_task():
    assert set(TASKS) == set(GLUE_EXPECTED) | {OFFLINE_TASK}
    assert TASKS[OFFLINE_TASK].num_labels == 2 and TASKS[OFFLINE_TASK].max_seq_length == 64


def test_default_task_is_offline_or_local(csv_pair):
    assert resolve_task(None).name == OFFLINE_TASK
    assert resolve_task(None, *csv_pair).name == LOCAL_TASK
    assert resolve_task("sst2", *csv_pair).name == "sst2"


# ---- the offline tweets task ----


def test_read_tweets_dedupes_drops_neutral_and_conflicts(tmp_path):
    rows = [
        {"sentiment": "negative", "confidence": "1", "text": "Delayed  AGAIN @united"},
        {"sentiment": "negative", "confidence": "", "text": "RT @someone: delayed again @united"},
        {"sentiment": "neutral", "confidence": "1", "text": "flight at noon"},
        {"sentiment": "positive", "confidence": "1", "text": "Great crew"},
        {"sentiment": "positive", "confidence": "1", "text": "mixed feelings"},
        {"sentiment": "negative", "confidence": "1", "text": "Mixed   feelings"},
        {"sentiment": "positive", "confidence": "1", "text": "   "},
    ]
    path = tmp_path / "tweets.csv"
    with open(path, "w", newline="", encoding="latin-1") as handle:
        writer = csv.DictWriter(handle, ["sentiment", "confidence", "text"])
        writer.writeheader()
        writer.writerows(rows)
    train, dev = read_tweets(path)
    texts = sorted(train["text"] + dev["text"])
    labels = dict(zip(train["text"] + dev["text"], train["label"] + dev["label"], strict=True))
    assert texts == ["Delayed  AGAIN @united", "Great crew"]
    assert labels == {"Delayed  AGAIN @united": 0, "Great crew": 1}


def test_read_tweets_rejects_other_columns(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [{"label": "negative", "sentence": "x"}])
    with pytest.raises(ValueError, match=r"lacks the columns \['sentiment', 'text'\]"):
        read_tweets(path)


def test_offline_corpus_split_is_deterministic_and_disjoint():
    train, dev = read_tweets()
    assert (len(train["text"]), len(dev["text"])) == (20156, 2220)
    assert set(train["label"]) == set(dev["label"]) == {0, 1}
    key = data_module._duplicate_key
    assert not {key(t) for t in train["text"]} & {key(t) for t in dev["text"]}
    assert read_tweets() == (train, dev)


def test_offline_task_loads_through_datasets_with_subsets():
    task = load_task_data(max_train_samples=100, max_eval_samples=40, seed=3)
    assert task.spec.name == OFFLINE_TASK
    assert (len(task.splits["train"]), len(task.splits["validation"])) == (100, 40)
    assert task.splits["train"].column_names == ["text", "label"]
    again = load_task_data(max_train_samples=100, max_eval_samples=40, seed=3)
    assert again.splits["train"]["text"] == task.splits["train"]["text"]


# ---- local files ----


def test_local_csv_detects_columns_and_maps_string_labels(csv_pair):
    task = load_task_data(train_file=csv_pair[0], validation_file=csv_pair[1])
    assert task.spec.name == LOCAL_TASK
    assert task.spec.text_columns == ("sentence",)
    assert task.spec.label_names == ("neg", "pos") and task.spec.num_labels == 2
    assert task.spec.metrics == ("accuracy", "f1")
    assert task.splits["train"]["label"][:4] == [0, 1, 0, 1]


def test_local_tsv_pair_columns(tmp_path):
    rows = [{"premise": f"p {i}", "hypothesis": f"h {i}", "gold": i % 3} for i in range(9)]
    train = write_csv(tmp_path / "train.tsv", rows, delimiter="\t")
    dev = write_csv(tmp_path / "dev.tsv", rows[:4], delimiter="\t")
    task = load_task_data(train_file=train, validation_file=dev, label_column="gold")
    assert task.spec.text_columns == ("premise", "hypothesis")
    assert task.spec.num_labels == 3 and task.spec.metrics == ("accuracy",)
    assert task.splits["validation"]["label"] == [0, 1, 2, 0]


def test_local_json_regression_and_explicit_columns(tmp_path):
    rows = [{"a": f"first {i}", "b": f"second {i}", "score": i / 2} for i in range(6)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    dev = tmp_path / "dev.json"
    dev.write_text("\n".join(json.dumps(row) for row in rows[:3]) + "\n")
    task = load_task_data(train_file=train, validation_file=dev, text_columns="b,a", label_column="score")
    assert task.spec.is_regression and task.spec.num_labels == 1
    assert task.spec.text_columns == ("b", "a")
    assert task.spec.main_metric == "pearson"
    assert task.splits["train"]["label"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]


def test_glue_task_from_local_files_accepts_label_names(tmp_path):
    rows = [{"sentence": f"s {i}", "label": ["negative", "positive"][i % 2]} for i in range(6)]
    train = write_csv(tmp_path / "train.csv", rows)
    dev = write_csv(tmp_path / "dev.csv", rows[:2])
    task = load_task_data("sst2", train_file=train, validation_file=dev)
    assert task.spec.name == "sst2" and task.spec.label_names == ("negative", "positive")
    assert task.splits["train"]["label"] == [0, 1, 0, 1, 0, 1]


# ---- errors, all before any training ----


def error_cases(tmp_path):
    good_train = write_csv(tmp_path / "train.csv", sentiment_rows(6))
    good_dev = write_csv(tmp_path / "dev.csv", sentiment_rows(3))
    unseen_dev = write_csv(tmp_path / "unseen.csv", sentiment_rows(3, labels=("neg", "meh")))
    one_class = write_csv(tmp_path / "one.csv", sentiment_rows(4, labels=("neg",)))
    no_label = write_csv(tmp_path / "nolabel.csv", [{"sentence": "x", "target": 1}])
    empty_label = write_csv(tmp_path / "emptylabel.csv", [{"sentence": "x", "label": "neg"},
                                                         {"sentence": "y", "label": ""}])
    many_text = write_csv(tmp_path / "many.csv", [{"a": "x", "b": "y", "c": "z", "label": 1}])
    bad_glue = write_csv(tmp_path / "badglue.csv", sentiment_rows(4, labels=("neg", "pos")))
    (tmp_path / "train.txt").write_text("sentence,label\nx,1\n")
    missing = str(tmp_path / "missing.csv")
    return {
        "unknown task": (dict(task="sst3"), r"--task must be one of .*'sst3'"),
        "missing train file": (dict(train_file=missing, validation_file=good_dev), r"--train_file .*missing.csv"),
        "train file alone": (dict(train_file=good_train), r"--train_file and --validation_file go together"),
        "bad extension": (dict(train_file=tmp_path / "train.txt", validation_file=good_dev), r"must end in one of"),
        "missing text column": (dict(train_file=good_train, validation_file=good_dev, text_columns="text"),
                                r"--train_file lacks the column\(s\) \['text'\]"),
        "too many text columns": (dict(train_file=good_train, validation_file=good_dev, text_columns="a,b,c"),
                                  r"--text_columns must name one or two"),
        "missing label column": (dict(train_file=no_label, validation_file=good_dev),
                                 r"--label_column 'label' is not a column"),
        "label also text": (dict(train_file=good_train, validation_file=good_dev, text_columns="label"),
                            r"--label_column 'label' is also a text column"),
        "undetectable text": (dict(train_file=many_text, validation_file=many_text), r"pass --text_columns"),
        "unseen dev label": (dict(train_file=good_train, validation_file=unseen_dev),
                             r"--validation_file column 'label' has labels \['meh'\] that --train_file lacks"),
        "one class": (dict(train_file=one_class, validation_file=good_dev), r"at least two classes"),
        "empty label": (dict(train_file=empty_label, validation_file=good_dev), r"row 1 has no label"),
        "unknown glue labels": (dict(task="sst2", train_file=bad_glue, validation_file=good_dev),
                                r"labels \['neg', 'pos'\] that task 'sst2' does not know"),
        "columns without files": (dict(text_columns="sentence"), r"only apply to --train_file"),
        "offline task with files": (dict(task=OFFLINE_TASK, train_file=good_train, validation_file=good_dev),
                                    r"reads its own corpus"),
        "local task without files": (dict(task=LOCAL_TASK), r"needs --train_file"),
        "zero samples": (dict(max_train_samples=0), r"--max_train_samples must be a positive integer"),
    }


ERROR_NAMES = [
    "unknown task", "missing train file", "train file alone", "bad extension", "missing text column",
    "too many text columns", "missing label column", "label also text", "undetectable text", "unseen dev label",
    "one class", "empty label", "unknown glue labels", "columns without files", "offline task with files",
    "local task without files", "zero samples",
]


@pytest.mark.parametrize("case", ERROR_NAMES)
def test_bad_input_raises_value_error(tmp_path, case):
    kwargs, message = error_cases(tmp_path)[case]
    with pytest.raises(ValueError, match=message):
        load_task_data(**kwargs)


def test_error_cases_are_all_tested(tmp_path):
    assert sorted(error_cases(tmp_path)) == sorted(ERROR_NAMES)


# ---- tokenization ----


class WhitespaceTokenizer:
    """Enough of a tokenizer for ``tokenize_task_data``: ids are word lengths, segments as in BERT."""

    def __call__(self, first, second=None, truncation=True, max_length=None):
        encoded = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        for index, text in enumerate(first):
            ids = [101] + [len(word) for word in text.split()] + [102]
            types = [0] * len(ids)
            if second is not None:
                extra = [len(word) for word in second[index].split()] + [102]
                ids, types = ids + extra, types + [1] * len(extra)
            ids, types = ids[:max_length], types[:max_length]
            encoded["input_ids"].append(ids)
            encoded["token_type_ids"].append(types)
            encoded["attention_mask"].append([1] * len(ids))
        return encoded


def test_tokenize_pairs_truncates_and_keeps_labels(tmp_path):
    rows = [{"sentence1": "a bb ccc dddd eeeee", "sentence2": "ff g", "label": i % 2} for i in range(4)]
    train = write_csv(tmp_path / "train.csv", rows)
    task = load_task_data(train_file=train, validation_file=train)
    tokenized = tokenize_task_data(task, WhitespaceTokenizer(), max_seq_length=8)
    first = tokenized["train"][0]
    assert first["input_ids"] == [101, 1, 2, 3, 4, 5, 102, 2]
    assert first["token_type_ids"] == [0, 0, 0, 0, 0, 0, 0, 1]
    assert tokenized["train"]["labels"] == [0, 1, 0, 1]
    assert sorted(tokenized["train"].column_names) == ["attention_mask", "input_ids", "labels", "token_type_ids"]


def test_tokenize_rejects_tiny_max_length(csv_pair):
    task = load_task_data(train_file=csv_pair[0], validation_file=csv_pair[1])
    with pytest.raises(ValueError, match=r"--max_seq_length must be an integer >= 8, got 4"):
        tokenize_task_data(task, WhitespaceTokenizer(), max_seq_length=4)


# ---- metrics, against values computed by hand ----


def test_classification_metrics_by_hand():
    # TP = 2, TN = 1, FP = 1, FN = 1.
    predictions, references = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    metrics = compute_metrics(("accuracy", "f1", "matthews_correlation"), predictions, references)
    assert metrics["accuracy"] == pytest.approx(3 / 5, abs=1e-12)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1), abs=1e-12)
    assert metrics["matthews_correlation"] == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2), abs=1e-12)


def test_regression_metrics_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0]
    metrics = compute_metrics(("pearson", "spearman"), x, y)
    assert metrics["pearson"] == pytest.approx(25 / math.sqrt(5 * 129), abs=1e-12)
    assert metrics["spearman"] == pytest.approx(1.0, abs=1e-12)


def test_degenerate_metrics():
    constant = compute_metrics(("pearson", "spearman", "matthews_correlation", "f1"), [0, 0, 0], [0, 1, 1])
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"])
    assert constant["matthews_correlation"] == 0.0 and constant["f1"] == 0.0


def test_metric_errors():
    with pytest.raises(ValueError, match=r"unknown \['bleu'\]"):
        compute_metrics(("accuracy", "bleu"), [1], [1])
    with pytest.raises(ValueError, match=r"same length, got shapes \(2,\) and \(3,\)"):
        compute_metrics(("accuracy",), [1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="must not be empty"):
        compute_metrics(("accuracy",), [], [])


def test_is_better():
    assert is_better(0.5, None) and is_better(math.nan, None)
    assert is_better(0.6, 0.5) and not is_better(0.5, 0.5) and not is_better(0.4, 0.5)
    assert not is_better(math.nan, 0.5) and is_better(0.1, math.nan)


def test_glue_without_hub_names_the_alternatives(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(data_module.datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"GLUE task 'rte'.*hub unreachable.*--train_file/--validation_file.*tweets"):
        load_task_data("rte")
    assert calls == [("glue", "rte")]


def test_glue_splits_and_columns_are_selected(monkeypatch):
    rows = {"premise": ["a", "b"], "hypothesis": ["c", "d"], "label": [0, 2], "idx": [0, 1]}
    raw = data_module.datasets.DatasetDict(
        train=data_module.datasets.Dataset.from_dict(rows),
        validation_matched=data_module.datasets.Dataset.from_dict(rows),
        validation_mismatched=data_module.datasets.Dataset.from_dict({**rows, "label": [1, 1]}),
    )
    monkeypatch.setattr(data_module.datasets, "load_dataset", lambda *args, **kwargs: raw)
    task = load_task_data("mnli")
    assert task.splits["validation"].column_names == ["premise", "hypothesis", "label"]
    assert task.splits["validation"]["label"] == [0, 2]
