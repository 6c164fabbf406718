"""Harmfulness judges: factories ``fn(params, ctx) -> Judge`` scoring (prompt, response) with P(harmful).

- ``minilm-harm`` (:mod:`evaluators.judges.minilm_harm`): a classifier on all-MiniLM-L6-v2 trained on
  the offline bundle, validated against human labels (XSTest) and LlamaGuard2; the default judge.
- ``refusal-keywords`` (:mod:`evaluators.judges.refusal_keywords`): a transparent, model-free baseline.
- ``hf-classifier`` (:mod:`evaluators.judges.hf_classifier`): any Hugging Face sequence classifier;
  by default the paper's DeBERTa BeaverTails judge (needs it downloaded).
- ``llm-judge`` (:mod:`evaluators.judges.llm_judge`): a chat model prompted Llama-Guard style, scored
  from its next-token probabilities of "unsafe" vs "safe".

:mod:`evaluators.judges.judge_data` holds the labelled training and held-out validation data.
Importing this package imports every module in it, which registers the judges.
"""

from harness.api import import_package_modules

import_package_modules(__name__, __path__)
