"""Document processing for the task YAMLs (copied next to them; referenced as ``!function task_utils.X``)."""

from __future__ import annotations

import re


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
