"""The field's standard harmfulness scorers as judges, each with its published prompt and score scale.

- ``strongreject-rubric`` (:mod:`.strongreject_rubric`): StrongREJECT's rubric on any chat grader.
- ``strongreject-finetuned`` (:mod:`.strongreject_finetuned`): StrongREJECT's fine-tuned Gemma-2B scorer.
- ``harmbench-cls`` (:mod:`.harmbench`): HarmBench's Llama-2-13b classifier or its Mistral-7b validation one.
- ``llama-guard-3`` (:mod:`.llama_guard`): Meta's Llama Guard 3 8B.
- ``wildguard`` (:mod:`.wildguard`): AI2's WildGuard.

The published prompt strings live in :mod:`.templates`, with their sources. All but the rubric need
their model's weights (a hub id with network, or ``model=<dir>``); the rubric defaults to the
embedded SmolLM2 so it runs offline. Importing this package registers the judges.
"""

from evaluators.judges.standard import (  # noqa: F401
    harmbench,
    llama_guard,
    strongreject_finetuned,
    strongreject_rubric,
    wildguard,
)
