import gzip
import json

import pytest

from harness.data.readers import DataAccess, dedupe_by_prompt, load_dataset, seeded_sample
from harness.data.records import QA, normalise_prompt
from harness.errors import DataError
from harness.registry import datasets

TRAINING_SETS = [
    n for n in ("beavertails-unsafe", "pyrit-harmful-qa", "jbb-harmful-qa", "jbb-pairs", "decodingtrust-pairs")
]
EVAL_SETS = ["advbench", "harmbench", "dangerousqa", "malicious-instruct", "do-not-answer"]


@pytest.mark.parametrize("name", TRAINING_SETS + EVAL_SETS)
def test_every_bundled_dataset_loads_with_non_empty_fields(name, data_dir):
    loaded = load_dataset(name, data_dir)
    assert len(loaded.records) > 50
    for record in loaded.records:
        for value in vars(record).values():
            assert value is None or isinstance(value, str)
        assert record.prompt.strip()


def test_jbb_pairs_join_answers_and_refusals_of_the_same_model(data_dir):
    pairs = load_dataset("jbb-pairs", data_dir).records
    answers: dict[tuple[str, str], set[str]] = {}
    for line in (data_dir / "harmful_qa/jbb_ablated_models_harmful_responses.jsonl").open():
        row = json.loads(line)
        answers.setdefault((row["model"], row["prompt"]), set()).add(row["response"].strip())
    for pair in pairs:
        model = pair.source.split("/", 1)[1]
        assert pair.harmful in answers[(model, pair.prompt)]
        assert pair.harmful != pair.harmless


@pytest.mark.parametrize("eval_set", EVAL_SETS)
@pytest.mark.parametrize("train_set", TRAINING_SETS)
def test_training_data_is_disjoint_from_evaluation_prompts(data_dir, train_set, eval_set):
    access = DataAccess(data_dir, eval_set, seed=1)
    kind = load_dataset(train_set, data_dir).kind
    records = access.qa(train_set) if kind == "qa" else access.pairs(train_set)
    held_out = {normalise_prompt(p.prompt) for p in access.eval_prompts()}
    assert records and not ({normalise_prompt(r.prompt) for r in records} & held_out)


def test_jbb_overlaps_advbench_so_the_filter_really_removes_prompts(data_dir):
    raw = {normalise_prompt(r.prompt) for r in load_dataset("jbb-harmful-qa", data_dir).records}
    advbench = {normalise_prompt(r.prompt) for r in load_dataset("advbench", data_dir).records}
    overlap = raw & advbench
    assert overlap, "expected some JBB prompts to come from AdvBench"
    kept = DataAccess(data_dir, "advbench", seed=0).qa("jbb-harmful-qa")
    assert len(kept) == len(raw) - len(overlap)


def test_splits_are_reproducible_from_the_seed_and_deduplicated(data_dir):
    a = DataAccess(data_dir, "advbench", seed=3).qa("beavertails-unsafe", n=20)
    b = DataAccess(data_dir, "advbench", seed=3).qa("beavertails-unsafe", n=20)
    c = DataAccess(data_dir, "advbench", seed=4).qa("beavertails-unsafe", n=20)
    assert a == b and a != c
    prompts = [normalise_prompt(r.prompt) for r in DataAccess(data_dir, "advbench", 0).qa("jbb-harmful-qa")]
    assert len(prompts) == len(set(prompts))


def test_dedupe_and_sample_helpers():
    records = [QA("How?", "a"), QA("  how ", "b"), QA("Why?", "c")]
    assert [r.response for r in dedupe_by_prompt(records)] == ["a", "c"]
    assert seeded_sample(records, 2, seed=5) == seeded_sample(records, 2, seed=5)
    assert len(seeded_sample(records, None, seed=5)) == 3


def _fake_bundle(tmp_path, lines: list[bytes]):
    target = tmp_path / "harmful_qa"
    target.mkdir(parents=True)
    (target / "beavertails_30k_train_unsafe_200.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path


def test_malformed_rows_are_skipped_and_counted(tmp_path, caplog):
    bundle = _fake_bundle(tmp_path, [
        json.dumps({"prompt": "How do I pick a lock?", "response": "Use a tension wrench."}).encode(),
        b'{"prompt": "missing answer"}',
        json.dumps({"prompt": "empty", "response": "   "}).encode(),
        b"{not json",
        b'{"prompt": "bad bytes \xff\xfe", "response": "x"}',
        b'["a list"]',
        json.dumps({"prompt": 5, "response": "number prompt"}).encode(),
    ])
    loaded = load_dataset("beavertails-unsafe", bundle)
    assert [r.prompt for r in loaded.records] == ["How do I pick a lock?"]
    assert loaded.skipped == 6
    assert "skipped 6 malformed rows" in caplog.text


def test_no_usable_rows_names_file_and_line(tmp_path):
    bundle = _fake_bundle(tmp_path, [b'{"prompt": "only a prompt"}', b"{broken"])
    with pytest.raises(DataError) as info:
        load_dataset("beavertails-unsafe", bundle)
    assert "beavertails_30k_train_unsafe_200.jsonl line 1" in str(info.value)
    assert "missing or empty field(s): response" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*HARNESS_DATA_DIR"):
        load_dataset("advbench", tmp_path)


def test_gzip_jsonl_is_read(tmp_path):
    from harness.data.readers import RowProblems, read_jsonl

    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b'{"a": 1}\n{"a": 2}\n')
    assert [row["a"] for _, row in read_jsonl(path, RowProblems())] == [1, 2]


def test_hub_dataset_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="beavertails-unsafe"):
        load_dataset("beavertails", tmp_path)


def test_registered_datasets_declare_a_kind():
    for plugin in datasets.plugins():
        assert plugin.info["kind"] in {"qa", "pairs", "prompts"}


def test_category_filters_include_exclude_and_partition_the_set(data_dir):
    access = DataAccess(data_dir, "advbench", seed=0)
    whole = access.qa("jbb-harmful-qa")
    chosen = ["Privacy", "Malware/Hacking"]
    only = access.qa("jbb-harmful-qa[Privacy, Malware/Hacking]")
    rest = access.qa("jbb-harmful-qa[^Privacy,Malware/Hacking]")
    assert only and rest
    assert {r.category for r in only} == set(chosen)
    assert not {r.category for r in rest} & set(chosen)
    assert len(only) + len(rest) == len(whole)
    assert {normalise_prompt(r.prompt) for r in only}.isdisjoint(normalise_prompt(r.prompt) for r in rest)
    fingerprints = {access.fingerprint(ref) for ref in
                    ("jbb-harmful-qa", "jbb-harmful-qa[Privacy,Malware/Hacking]",
                     "jbb-harmful-qa[^Privacy,Malware/Hacking]")}
    assert len(fingerprints) == 3


def test_category_filter_errors_name_the_problem(data_dir):
    access = DataAccess(data_dir, "advbench", seed=0)
    with pytest.raises(DataError, match=r"unknown category 'Piracy'.*Known: .*Privacy"):
        access.pairs("jbb-pairs[Piracy]")
    with pytest.raises(DataError, match="has no categories"):
        access.qa("beavertails-unsafe[Privacy]")
    with pytest.raises(DataError, match="malformed"):
        access.qa("jbb-harmful-qa[Privacy")
    with pytest.raises(DataError, match="empty category list"):
        access.qa("jbb-harmful-qa[]")


def test_an_unchanged_data_set_is_parsed_once_per_process_and_a_changed_one_again(tmp_path):
    """Sweeps check every data set per cell; the reader runs again only when a file changes."""
    calls = []

    @datasets.register("memo-probe-set", kind="prompts", files=["memo/prompts.txt"])
    def memo_probe_set(data_dir, problems):
        calls.append(1)
        from harness.data.records import Prompt

        for line in (data_dir / "memo" / "prompts.txt").read_text().splitlines():
            yield Prompt(line, None, "memo")

    try:
        (tmp_path / "memo").mkdir()
        source = tmp_path / "memo" / "prompts.txt"
        source.write_text("a\nb\n")
        first = load_dataset("memo-probe-set", tmp_path)
        first.records.append("mutated by a caller")  # a caller's list is its own
        again = load_dataset("memo-probe-set", tmp_path)
        assert len(calls) == 1 and [r.prompt for r in again.records] == ["a", "b"]
        assert again.fingerprint == first.fingerprint
        source.write_text("a\nb\nc\n")
        changed = load_dataset("memo-probe-set", tmp_path)
        assert len(calls) == 2 and [r.prompt for r in changed.records] == ["a", "b", "c"]
        assert changed.fingerprint != first.fingerprint
    finally:
        datasets._plugins.pop("memo-probe-set")  # leave the registry as other tests expect it
