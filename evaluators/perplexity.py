"""Perplexity of the model on held-out harmless text: a fluency guard next to the capability benchmarks.

perplexity = exp(total NLL / total scored tokens): one token-weighted mean over the whole set (as lm-eval's
``word_perplexity``/wikitext do per token), not a mean of per-text perplexities. Every text is tokenised
without special tokens and, by default, preceded by one prefix token (BOS, else EOS: lm-eval's convention
for rolling log-likelihoods) so that its first token is scored too; texts longer than ``max_length`` are
truncated. The prefix matters for short texts: for SmolLM2-135M-Instruct, whose BOS is the chat token
``<|im_start|>``, 60 DART sentences give 99 with BOS, 100 with EOS, 71 with its pre-training document
separator ``<|endoftext|>`` and 86 with no prefix (first tokens unscored); compare models under one setting.
``bits_per_byte`` (total NLL in bits / UTF-8 bytes of the scored text) compares across tokenizers.

Sources (offline bundle):
- ``dart`` (default): the reference sentences of DART dev (WebNLG, Wikipedia tables, E2E; ~7k
  sentences) — the broadest plain harmless English in the bundle, the closest to the paper's web text;
- ``viggo`` / ``e2e``: the test references of those data-to-text tasks (one narrow domain each);
- ``hh-rlhf-chosen``: Anthropic HH harmless-base test, the *chosen* dialogue (``Human: ... Assistant: ...``).
  Not the default: these are red-teaming conversations whose "chosen" side is only the less harmful of
  two replies, and often still discusses harmful topics, so a defence that suppresses harmful text
  raises it by design.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.api import (
    ConfigError,
    DataError,
    EvalResult,
    LoadedModel,
    Params,
    StageContext,
    evaluators,
    file_sha256,
    resolve_data_dir,
)

SOURCES: dict[str, str] = {
    "dart": "harmless_tasks/dart_v1.1.1_full_dev.json",
    "viggo": "harmless_tasks/viggo_test.csv",
    "e2e": "harmless_tasks/e2e_testset_w_refs.csv",
    "hh-rlhf-chosen": "harmful_qa/hh_rlhf_harmless_base_test.jsonl.gz",
}


class PerplexityParams(Params):
    source: Literal["dart", "viggo", "e2e", "hh-rlhf-chosen"] = Field("dart", description="held-out text set")
    num_texts: int | None = Field(200, ge=1, description="texts scored (fixed seeded subset; None: all)")
    data_seed: int = Field(0, description="picks the subset; fixed so runs with other seeds compare")
    max_length: int = Field(256, ge=2, description="tokens per text including the prefix token, truncated")
    batch_size: int = Field(8, ge=1, description="texts per forward pass")
    prefix: str = Field(
        "bos",
        description="token before each text so its first token is scored: bos (lm-eval's choice; EOS if the "
        "tokenizer has no BOS), eos, none (first token unscored), or a literal token such as <|endoftext|>",
    )


def read_texts(source: str, data_dir: Path) -> list[str]:
    """Distinct non-empty texts of a source, in file order."""
    path = data_dir / SOURCES[source]
    if not path.is_file():
        raise DataError(f"Perplexity source {source!r} needs {path}, which does not exist (check --data-dir).")
    texts: list[str] = []
    if source == "dart":
        with open(path, encoding="utf-8") as fh:
            for entry in json.load(fh):
                texts += [a.get("text") or "" for a in entry.get("annotations", [])]
    elif source in ("viggo", "e2e"):
        with open(path, encoding="utf-8", newline="") as fh:
            texts = [row.get("ref") or "" for row in csv.DictReader(fh)]
    else:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            texts = [json.loads(line).get("chosen") or "" for line in fh if line.strip()]
    seen: set[str] = set()
    distinct = []
    for text in (t.strip() for t in texts):
        if text and text not in seen:
            seen.add(text)
            distinct.append(text)
    if not distinct:
        raise DataError(f"{path}: no texts for perplexity.")
    return distinct


def prefix_ids(tokenizer: Any, prefix: str) -> list[int]:
    """The prefix token as a list of zero or one id."""
    if prefix == "none":
        return []
    if prefix == "bos":
        return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    if prefix == "eos":
        return [tokenizer.eos_token_id]
    token_id = tokenizer.convert_tokens_to_ids(prefix)
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != prefix:  # unknown: mapped to unk
        raise ConfigError(f"perplexity.prefix: {prefix!r} is not a token of this tokenizer; use bos, eos or none.")
    return [token_id]


def encode_texts(tokenizer: Any, texts: list[str], prefix: str) -> list[list[int]]:
    """Token ids of each text (no special tokens), after the prefix token; not truncated."""
    head = prefix_ids(tokenizer, prefix)
    return [head + list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


@torch.no_grad()
def sequence_nlls(model: torch.nn.Module, sequences: list[list[int]], pad_id: int, batch_size: int,
                  starts: list[int] | None = None) -> list[tuple[float, int]]:
    """(summed NLL in nats, number of scored tokens) per sequence; every token after the first is scored,
    or, with ``starts``, only the tokens at index >= starts[i] (e.g. an answer after its prompt).

    Sequences are length-sorted and right-padded; padding is neither attended to nor scored.
    """
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        length = max(len(sequences[i]) for i in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            attention[row, : len(sequences[i])] = 1
        ids, attention = ids.to(device), attention.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        scored = attention[:, 1:].to(nll.dtype)
        if starts is not None:  # target index t sits at column t - 1
            first = torch.tensor([max(starts[i], 1) - 1 for i in chunk], device=device)
            scored = scored * (torch.arange(length - 1, device=device)[None, :] >= first[:, None]).to(nll.dtype)
        sums, counts = (nll * scored).sum(dim=1), scored.sum(dim=1)
        for row, i in enumerate(chunk):
            out[i] = (float(sums[row]), int(counts[row]))
    return out


def perplexity_data_files(params: PerplexityParams) -> list[str]:
    """Bundle-relative file the source reads (for the stage's cache key)."""
    return [SOURCES[params.source]]


@evaluators.register(
    "perplexity",
    headline="perplexity",
    params=PerplexityParams,
    description="Token-level perplexity on held-out harmless text (default: DART reference sentences)",
    data_files=perplexity_data_files,
    profiles={"cpu": {"num_texts": 100}},
)
def perplexity(model: LoadedModel, params: PerplexityParams, ctx: StageContext) -> EvalResult:
    data_dir = Path(getattr(ctx.data, "data_dir", None) or resolve_data_dir())
    texts = read_texts(params.source, data_dir)
    order = list(range(len(texts)))
    random.Random(params.data_seed).shuffle(order)
    texts = [texts[i] for i in order[: params.num_texts or len(order)]]

    tokenizer = model.tokenizer
    full = encode_texts(tokenizer, texts, params.prefix)
    sequences = [seq[: params.max_length] for seq in full]
    if not any(len(s) >= 2 for s in sequences):
        raise DataError("Perplexity: every text is shorter than two tokens; nothing to score.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch_model = model.model
    was_training = torch_model.training
    torch_model.eval()
    try:
        scores = sequence_nlls(torch_model, sequences, pad_id, params.batch_size)
    finally:
        torch_model.train(was_training)

    total_nll = sum(s for s, _ in scores)
    total_tokens = sum(n for _, n in scores)
    # the scored tokens are seq[1:] (the text after the prefix token, or after the unscored first token)
    total_bytes = sum(len(tokenizer.decode(seq[1:]).encode("utf-8")) for seq in sequences)
    mean_nll = total_nll / total_tokens
    metrics = {
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "bits_per_byte": total_nll / math.log(2) / total_bytes if total_bytes else None,
        "tokens": total_tokens,
        "n_texts": len(texts),
        "truncated": sum(1 for seq in full if len(seq) > params.max_length),
    }
    records = [
        {"source": params.source, "text": text[:120], "tokens": n, "nll": round(s, 4),
         "perplexity": round(math.exp(s / n), 4) if n else None}
        for text, (s, n) in zip(texts, scores)
    ]
    info = {
        "source_file": SOURCES[params.source],
        "source_sha256": file_sha256(data_dir / SOURCES[params.source]),
        "prefix_token_ids": prefix_ids(tokenizer, params.prefix),
        "settings": params.model_dump(mode="json"),
    }
    return EvalResult(metrics=metrics, records=records, info=info)
