"""Leave-one-source-out validation: fold hygiene on the real bundle, metrics by hand, the feature cache."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluators.judge_validation import expected_calibration_error, loso_table, roc_auc
from evaluators.judges import judge_data, loso
from evaluators.judges import minilm_harm as mh
from evaluators.judges.judge_data import Labelled
from harness.data.records import normalise_prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def real_bundle(data_dir) -> loso.Bundle:
    """Every source and the synthetic negatives, without features (no backbone run)."""
    return loso.build_bundle(data_dir, Path("/nonexistent"), embedder=object(), embed=False)


def test_every_source_is_loaded_with_its_labels(real_bundle):
    counts = {name: [0, 0] for name in loso.SOURCES}
    for item, source in zip(real_bundle.items, real_bundle.sources):
        if source != loso.SYNTHETIC:
            counts[source][item.label] += 1
    for name in ("xstest", "jbb", "openai-moderation", "decodingtrust"):
        assert min(counts[name]) > 0, name  # mixed sources
    for name in ("pyrit", "beavertails"):
        assert counts[name][0] == 0 and counts[name][1] > 0, name
    for name in ("harmbench-safe", "safety-tuned-llamas", "harmless-tasks", "benign-qa"):
        assert counts[name][1] == 0 and counts[name][0] > 0, name
    assert sum(s == loso.SYNTHETIC for s in real_bundle.sources) > 0
    # every source is held out by exactly one fold
    held = [s for fold in loso.FOLDS for s in fold.sources]
    assert sorted(held) == sorted(loso.SOURCES)


def test_folds_never_share_a_source_prompt_or_response_on_the_real_bundle(real_bundle):
    for fold in loso.FOLDS:
        train, test = loso.fold_split(real_bundle, fold)
        assert len(train) and len(test), fold.name
        assert {real_bundle.sources[i] for i in test} == set(fold.sources)
        assert not {real_bundle.sources[i] for i in train} & set(fold.sources)
        test_prompts = {normalise_prompt(real_bundle.items[i].prompt) for i in test}
        test_responses = {" ".join(real_bundle.items[i].response.lower().split()) for i in test}
        for i in train:
            item = real_bundle.items[i]
            assert normalise_prompt(item.prompt) not in test_prompts, (fold.name, item.source)
            assert " ".join(item.response.lower().split()) not in test_responses, (fold.name, item.source)
            assert not loso.synthetic_origins(item) & set(fold.sources), (fold.name, item.source)


def test_jbb_fold_drops_the_prompts_other_sources_share(real_bundle):
    """JailbreakBench behaviours recur in other sources: those items leave the training side."""
    fold = next(f for f in loso.FOLDS if f.name == "jbb")
    train, _ = loso.fold_split(real_bundle, fold)
    eligible = [i for i, s in enumerate(real_bundle.sources) if s != "jbb"
                and not loso.synthetic_origins(real_bundle.items[i]) & {"jbb"}]
    assert len(train) < len(eligible)


def test_deployed_training_pool_avoids_validation_prompts(real_bundle, data_dir):
    held = judge_data.validation_prompts(data_dir)
    index = loso.training_index(real_bundle, mh.DEFAULT_TRAIN_SOURCES, held)
    assert len(index)
    assert all(normalise_prompt(real_bundle.items[i].prompt) not in held for i in index)
    assert "xstest" not in {real_bundle.sources[i] for i in index}
    assert {real_bundle.items[i].label for i in index} == {0, 1}


# -- metrics by hand ------------------------------------------------------------------------------
def _synthetic_bundle() -> loso.Bundle:
    """Three sources; feature column 0 holds the logit a stub head returns."""
    rows = [  # (source, label, logit)
        ("a", 1, 2.0), ("a", 1, -1.0), ("a", 0, 0.5), ("a", 0, -2.0),
        ("b", 1, 1.0), ("b", 0, 3.0), ("b", 0, -3.0),
        ("c", 0, -1.0), ("c", 0, 1.0),
    ]
    items = [Labelled(f"prompt {i} of {s}", f"answer {i}", y, s) for i, (s, y, _) in enumerate(rows)]
    x = torch.zeros((len(rows), len(loso.ALL_LAYERS) * mh.EMBEDDING_DIM))
    x[:, 0] = torch.tensor([logit for _, _, logit in rows])
    return loso.Bundle(items, {e: x.clone() for e in loso.ENCODINGS}, [s for s, _, _ in rows])


class _Column0(torch.nn.Module):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, 0]


def test_per_fold_metrics_equal_a_hand_computation(monkeypatch):
    bundle = _synthetic_bundle()
    trained_on = {}

    def stub(b, x, index, params):
        trained_on[len(trained_on)] = sorted({b.sources[i] for i in index})
        return _Column0(), {}

    monkeypatch.setattr(loso, "train_head_on", stub)
    folds = (loso.Fold("a", ("a",)), loso.Fold("b", ("b",)), loso.Fold("c", ("c",), "negatives only"))
    params = mh.MiniLMHarmParams(features="joint", pool_layers=[1], train_sources=["jbb"])
    result = loso.run_loso(bundle, params, folds=folds, train_sources={"a", "b", "c"})
    # fold a: scores sigmoid(2), sigmoid(-1) for the harmful, sigmoid(0.5), sigmoid(-2) for the rest
    s = torch.sigmoid(torch.tensor([2.0, -1.0, 0.5, -2.0])).tolist()
    a = result["folds"]["a"]
    assert a["roc_auc"] == pytest.approx(3 / 4)  # 2 beats both; -1 beats only -2
    assert a["accuracy"] == pytest.approx(2 / 4)  # predicted 1, 0, 1, 0 against 1, 1, 0, 0
    assert a["confusion"] == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert a["mean_score"] == pytest.approx(sum(s) / 4)
    assert a["true_rate"] == pytest.approx(0.5)
    assert a["ece"] == pytest.approx(expected_calibration_error([1, 1, 0, 0], s))
    assert (a["n"], a["positives"]) == (4, 2)
    b = result["folds"]["b"]  # harmful 1.0 against 3.0 and -3.0: beats one of two
    assert b["roc_auc"] == pytest.approx(0.5)
    assert b["accuracy"] == pytest.approx(2 / 3)
    c = result["folds"]["c"]  # one class: no ROC-AUC, a clear message, accuracy = specificity
    assert c["roc_auc"] is None and "one class only (negatives)" in c["note"]
    assert c["accuracy"] == pytest.approx(1 / 2)
    assert result["summary"]["worst_roc_auc"] == pytest.approx(0.5) and result["summary"]["worst_fold"] == "b"
    assert result["summary"]["mean_roc_auc"] == pytest.approx((0.75 + 0.5) / 2)
    assert result["summary"]["folds_with_auc"] == 2
    # each fold trains on the other sources
    assert trained_on == {0: ["b", "c"], 1: ["a", "c"], 2: ["a", "b"]}
    table = loso_table(result)
    assert table.row_count == 3


def test_fold_training_uses_the_other_sources_of_the_mix():
    bundle = _synthetic_bundle()
    train, test = loso.fold_split(bundle, loso.Fold("a", ("a",)), train_sources={"b", "c"})
    assert sorted({bundle.sources[i] for i in train}) == ["b", "c"]
    assert sorted({bundle.sources[i] for i in test}) == ["a"]
    train, _ = loso.fold_split(bundle, loso.Fold("a", ("a",)), train_sources={"b"})
    assert {bundle.sources[i] for i in train} == {"b"}


def test_a_positives_only_fold_says_so():
    row = loso.fold_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert row["roc_auc"] is None
    assert "one class only (positives)" in row["note"] and "sensitivity" in row["note"]
    assert row["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(roc_auc([1, 1, 1], [0.9, 0.2, 0.7]))
    summary = loso.summarise_folds({"x": row})
    assert summary["worst_roc_auc"] is None and summary["folds_with_auc"] == 0


def test_source_weights_balance_every_source_and_class():
    w = loso.sample_weights(["a", "a", "a", "b"], [1, 1, 0, 0], "source")
    assert w.mean().item() == pytest.approx(1.0)
    # groups (a,1) x2, (a,0) x1, (b,0) x1: each group sums to the same total
    assert (w[0] + w[1]).item() == pytest.approx(w[2].item()) == pytest.approx(w[3].item())
    assert torch.equal(loso.sample_weights(["a", "b"], [1, 0], "none"), torch.ones(2))


# -- the feature cache ----------------------------------------------------------------------------
@pytest.fixture()
def own_data(tmp_path, data_dir) -> Path:
    """The bundle by symlinks, with HarmBench's safe responses as a real, writable copy."""
    root = tmp_path / "data"
    for folder in Path(data_dir).iterdir():
        if folder.is_dir():
            (root / folder.name).mkdir(parents=True)
            for f in folder.iterdir():
                (root / folder.name / f.name).symlink_to(f)
    target = root / judge_data.HARMBENCH_SAFE
    target.unlink()
    shutil.copyfile(Path(data_dir) / judge_data.HARMBENCH_SAFE, target)
    target.chmod(0o644)
    return root


def test_feature_cache_is_reused_and_invalidated_when_the_file_changes(own_data, tmp_path):
    cache = tmp_path / "cache"
    embedder = loso.Embedder(max_length=32, batch_size=8)
    build = lambda: loso.build_bundle(own_data, cache, embedder, sources=["harmbench-safe"],  # noqa: E731
                                      synthetic=False, cap=4)
    calls = loso.EMBED_CALLS
    first = build()
    assert loso.EMBED_CALLS == calls + 1
    assert first.features["pair"].shape == (4, len(loso.ALL_LAYERS) * mh.EMBEDDING_DIM)
    files = list((cache / "judges" / "features").glob(f"harmbench-safe-*/{loso.FEATURES_FILE}"))
    assert len(files) == 1

    again = build()  # cache hit: nothing embedded
    assert loso.EMBED_CALLS == calls + 1
    assert all(torch.equal(first.features[e], again.features[e]) for e in loso.ENCODINGS)

    # the same features as the judge computes at scoring time (same encodings, pooling and layers)
    params = mh.MiniLMHarmParams(max_length=32, pool_layers=[2, 6], refusal_feature=True)
    judge = mh.MiniLMHarmJudge(*embedder._load(), mh._new_head(params), params, {"version": "t"}, None,
                               torch.device("cpu"))
    live = judge.features([x.prompt for x in first.items], [x.response for x in first.items])
    assert torch.allclose(loso.feature_matrix(first, params), live, atol=1e-5)

    # a changed data file is a new key: re-embedded, the old entry left as it was
    path = own_data / judge_data.HARMBENCH_SAFE
    path.write_text(path.read_text().replace(".", "!", 1))
    changed = build()
    assert loso.EMBED_CALLS == calls + 2
    assert len(list((cache / "judges" / "features").glob(f"harmbench-safe-*/{loso.FEATURES_FILE}"))) == 2
    assert len(changed.items) == 4


def test_a_corrupt_cache_entry_is_rebuilt(own_data, tmp_path):
    cache = tmp_path / "cache"
    embedder = loso.Embedder(max_length=32, batch_size=8)
    loso.build_bundle(own_data, cache, embedder, sources=["harmbench-safe"], synthetic=False, cap=4)
    (entry,) = (cache / "judges" / "features").glob(f"harmbench-safe-*/{loso.FEATURES_FILE}")
    entry.write_bytes(b"not safetensors")
    calls = loso.EMBED_CALLS
    rebuilt = loso.build_bundle(own_data, cache, embedder, sources=["harmbench-safe"], synthetic=False, cap=4)
    assert loso.EMBED_CALLS == calls + 1 and rebuilt.features["pair"].shape[0] == 4
    assert np.isfinite(rebuilt.features["pair"].numpy()).all()
