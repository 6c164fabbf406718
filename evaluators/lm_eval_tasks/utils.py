"""Python hooks the local lm-eval task configs refer to with ``!function evaluators.lm_eval_tasks.utils.X``.

Only ``mmlu_local`` needs any: it is one task over all 57 subjects (so one ``limit`` gives a sample that
spans subjects) but keeps lm-eval's per-subject behaviour of its ``mmlu_<subject>`` tasks: few-shot
examples are the first k dev questions of the question's own subject.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import datasets
from lm_eval.api.samplers import ContextSampler
from lm_eval.api.task import ConfigurableTask


def interleave_subjects(dataset: datasets.Dataset) -> datasets.Dataset:
    """Reorder rows round-robin over subjects (alphabetical), keeping the file order within a subject.

    The first 57 rows are then the first question of every subject, so ``limit=N`` gives a subject-
    balanced subset; the full set (no limit) is unchanged apart from its order.
    """
    by_subject: dict[str, list[int]] = defaultdict(list)
    for index, subject in enumerate(dataset["subject"]):
        by_subject[subject].append(index)
    queues = [by_subject[s] for s in sorted(by_subject)]
    order = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    return dataset.select(order)


class SameSubjectFirstNSampler(ContextSampler):
    """lm-eval's ``first_n`` sampler restricted to the dev questions of the current document's subject."""

    subject: str | None = None  # set by SubjectFewshotTask before each document's context is built

    def sample(self, n: int, eval_doc: dict[str, Any] | None = None, df: Any = None, **kwargs: Any) -> list:
        subject = (eval_doc or {}).get("subject", self.subject)
        pool = [d for d in self.fewshot_docs() if d["subject"] == subject]
        if n > len(pool):
            raise ValueError(f"{n}-shot requested but subject {subject!r} has only {len(pool)} dev questions.")
        return pool[:n]


class SubjectFewshotTask(ConfigurableTask):
    """A ConfigurableTask that tells its sampler which subject the current document belongs to.

    lm-eval passes the evaluated document to the sampler only when few-shot examples come from the
    test split; MMLU's come from dev, so the subject is handed over here instead.
    """

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # lm-eval hands a `class:` task its whole YAML, including the `class` key TaskConfig rejects
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def fewshot_context(self, doc: dict, num_fewshot: int, *args: Any, **kwargs: Any) -> Any:
        sampler = getattr(self, "sampler", None)
        if isinstance(sampler, SameSubjectFirstNSampler):
            sampler.subject = doc["subject"]
        return super().fewshot_context(doc, num_fewshot, *args, **kwargs)
