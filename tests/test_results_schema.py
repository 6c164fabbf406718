"""results.json v2: the schema accepts what runs write, names every bad field, migrates v1 and
refuses versions from the future."""

import copy
import json
from importlib import resources

import leaderboard_fixtures as lf
import pytest

from harness.results.schema import (
    SCHEMA_VERSION,
    ResultsSchemaError,
    ResultsVersionError,
    load_results,
    migrate,
    schema,
    validate_results,
)


@pytest.fixture(scope="session")
def grid_runs(tmp_path_factory):
    return lf.grid(tmp_path_factory)


@pytest.fixture
def written(grid_runs):
    """A results.json as a defended run writes it (with the undefended reference branch)."""
    return json.loads(lf.find_run(grid_runs, "repnoise", "lora", 1).read_text())


def problems(obj) -> str:
    with pytest.raises(ResultsSchemaError) as info:
        validate_results(obj, "r.json")
    return str(info.value)


def test_schema_is_a_valid_draft_2020_12_schema_shipped_as_package_data():
    from jsonschema import Draft202012Validator

    assert resources.files("harness.results").joinpath("schemas", f"results-v{SCHEMA_VERSION}.schema.json").is_file()
    Draft202012Validator.check_schema(schema())
    assert schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_written_results_file_validates_with_the_v2_blocks(grid_runs):
    files = lf.results_files(grid_runs)
    assert len(files) == 8
    for path in files:
        obj = load_results(path)
        assert obj["schema_version"] == SCHEMA_VERSION == 2
        assert obj["judge"]["name"] == "refusal-keywords" and obj["judge"]["accuracy"] is None
        post = obj["summary"]["branches"]["defended"]["post_attack"]["harmfulness"]
        raw = obj["results"]["defended"]["post_attack"]["harmfulness"]["metrics"]["refusal-keywords"]
        assert post["mean"] == raw["mean"] and post["n"] == raw["n"] == 8


def test_missing_provenance_is_named_field_by_field(written):
    obj = copy.deepcopy(written)
    del obj["model"]["fingerprint"]
    del obj["attack"]["threat_model"]
    del obj["data"]["fingerprints"]
    del obj["libraries"]["torch"]
    del obj["results"]["defended"]["post_attack"]["harmfulness"]["info"]["generation"]
    del obj["code_version"]
    message = problems(obj)
    for path in ("model.fingerprint", "attack.threat_model", "data.fingerprints", "libraries.torch",
                 "results.defended.post_attack.harmfulness.info.generation", "code_version"):
        assert f"{path}: missing required field" in message, message
    assert message.startswith("r.json does not match results schema v2")


def test_implausible_values_are_named(written):
    obj = copy.deepcopy(written)
    scores = obj["results"]["defended"]["post_attack"]["harmfulness"]["metrics"]["refusal-keywords"]
    scores["mean"], scores["n"] = 1.5, 0
    obj["seed"] = "seven"
    message = problems(obj)
    assert "results.defended.post_attack.harmfulness.metrics.refusal-keywords.mean: 1.5 is above 1" in message
    assert "refusal-keywords.n: 0 is below 1" in message
    assert "seed: expected integer, got 'seven'" in message


def test_summary_must_agree_with_the_results(written):
    obj = copy.deepcopy(written)
    obj["results"]["defended"]["post_attack"]["harmfulness"]["metrics"]["refusal-keywords"]["mean"] = 0.25
    assert "summary.branches.defended.post_attack: does not match results.defended.post_attack" in problems(obj)
    validate_results(lf.refresh(obj))  # recomputed: valid again


def test_evaluators_may_add_fields_inside_metrics_and_info(written):
    obj = copy.deepcopy(written)
    obj["results"]["defended"]["post_attack"]["harmfulness"]["metrics"]["new_number"] = 3.5
    obj["results"]["defended"]["post_attack"]["harmfulness"]["info"]["anything"] = {"nested": [1, 2]}
    lf.add_evaluation(obj, "fluency", {"degenerate": False, "distinct_2": 0.4})
    obj["something_new_at_top"] = {"ok": True}
    validate_results(lf.refresh(obj))


def test_v1_files_migrate_to_v2(written, tmp_path):
    v1 = {k: v for k, v in written.items() if k not in ("judge", "summary")}
    v1["schema_version"] = 1
    path = tmp_path / "results.json"
    path.write_text(json.dumps(v1))
    migrated = load_results(path)
    assert migrated["schema_version"] == 2
    assert migrated["judge"] == written["judge"] and migrated["summary"] == written["summary"]
    assert json.loads(path.read_text())["schema_version"] == 1  # reading never rewrites the file


def test_a_future_version_fails_clearly(written, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**written, "schema_version": 3}))
    with pytest.raises(ResultsVersionError, match=r"schema version 3 was written by a newer harness.*Upgrade"):
        load_results(path)


@pytest.mark.parametrize("version", [None, "2", 0, True])
def test_a_missing_or_odd_version_fails_clearly(written, version):
    obj = {**written, "schema_version": version}
    with pytest.raises(ResultsVersionError, match="schema_version|unknown schema version"):
        migrate(obj, "r.json")


def test_not_json_fails_clearly(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{not json")
    with pytest.raises(ResultsSchemaError, match="not valid JSON"):
        load_results(path)


def test_a_v1_file_missing_what_migration_needs_names_it(written, tmp_path):
    v1 = {k: v for k, v in written.items() if k not in ("judge", "summary", "results")}
    v1["schema_version"] = 1
    with pytest.raises(ResultsSchemaError, match="cannot migrate schema v1 to v2: field 'results'"):
        migrate(v1, "old.json")


def test_the_shipped_schema_is_generated_from_the_typed_model():
    from harness.results.model import SCHEMA_FILE, schema_text

    assert SCHEMA_FILE.read_text() == schema_text(), "stale: run `python -m harness.results.model`"


def test_the_generated_schema_accepts_written_files_and_rejects_what_the_model_rejects(written):
    """Outside tools validate with the JSON Schema; it must agree with the model on both sides."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    assert not list(validator.iter_errors(written))
    broken = copy.deepcopy(written)
    broken["compute"]["train_tokens"] = -1
    del broken["model"]["fingerprint"]
    assert len(list(validator.iter_errors(broken))) == 2
    message = problems(broken)
    assert "compute.train_tokens: -1 is below 0" in message and "model.fingerprint: missing required field" in message


def test_numbers_are_not_coerced_from_text_nor_infinite(written):
    obj = copy.deepcopy(written)
    obj["compute"]["wall_seconds_this_run"] = "12.5"
    obj["results"]["defended"]["post_attack"]["harmfulness"]["metrics"]["refusal-keywords"]["mean"] = float("nan")
    message = problems(obj)
    assert "compute.wall_seconds_this_run: expected number, got '12.5'" in message
    assert "refusal-keywords.mean: not a finite number" in message
