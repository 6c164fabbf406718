"""`harness leaderboard add` against hostile submissions built here (no committed binaries): a recorded
config that would run other code or write elsewhere, a config that disagrees with its record,
numbers that disagree with the generation records, a submitter-set fluency verdict, JSON nested
200,000 levels deep, and the CLI's handling of a directory or a file given in the wrong place."""

import json

import leaderboard_fixtures as lf
import pytest
from conftest import flat
from typer.testing import CliRunner

from harness.cli import app
from harness.results.schema import ResultsSchemaError, loads_bounded
from leaderboard.archive import SubmissionError
from leaderboard.intake import add, open_submission
from leaderboard.package import MANIFEST, package

runner = CliRunner()
DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.fixture(scope="session")
def grid_runs(tmp_path_factory):
    return lf.grid(tmp_path_factory)


@pytest.fixture(scope="session")
def good(grid_runs, tmp_path_factory):
    path, _ = package(grid_runs, tmp_path_factory.mktemp("hostile") / "good.tar.gz")
    return path


def _config(mutate):
    """Change the recorded config (and its config.json copy) of one run."""
    return lambda files: lf.edit_results(files, lambda o: mutate(o["config"]))


def _remote_code(config):
    config["model"]["trust_remote_code"] = True


def _rename_run(name: str):
    def mutate(obj):
        obj["run_name"] = obj["config"]["run_name"] = name
    return lambda files: lf.edit_results(files, mutate)


def _forge_summary(files):
    """The reported harm: 0.0 in the metrics and summary, while every record scores 1.0."""
    lf.edit_results(files, lambda o: lf.set_harm(o, 0.0, ci=(0.0, 0.0)))


def _fluency_ok(files):
    """A submitter-set verdict over honest measurements: the tiny model's answers are gibberish, so the
    guard really fires."""
    def verdict_only(obj):
        for content in obj["results"].values():
            for phase in ("pre_attack", "post_attack"):
                content[phase]["harmfulness"]["metrics"]["fluency"].update(degenerate=False, level="ok")

    lf.edit_results(files, verdict_only)


def _bad_record_score(files):
    member = lf.results_member(files)
    obj = json.loads(files[member])
    source = member.rsplit("/", 1)[0] + "/" + obj["results"]["defended"]["post_attack"]["harmfulness"]["records"]
    lines = files[source].decode().splitlines()
    first = json.loads(lines[0])
    first["scores"] = {k: 7.0 for k in first["scores"]}
    files[source] = ("\n".join([json.dumps(first), *lines[1:]]) + "\n").encode()


def _deep(where: str):
    def change(files):
        if where == "results":
            files[lf.results_member(files)] = DEEP
        elif where == "manifest":
            files[MANIFEST] = DEEP
        else:
            member = lf.results_member(files)
            obj = json.loads(files[member])
            source = member.rsplit("/", 1)[0] + "/" + obj["results"]["defended"]["post_attack"]["harmfulness"][
                "records"]
            files[source] = DEEP + b"\n"
    return change


def _config_copy_differs(files):
    member = lf.results_member(files)
    name = member.rsplit("/", 1)[0] + "/config.json"
    config = json.loads(files[name])
    config["seed"] = 999
    files[name] = json.dumps(config).encode()


CASES = {  # name: (change, words the refusal must contain)
    "trust_remote_code in the config": (_config(_remote_code), ["config.model.trust_remote_code is True"]),
    "trust_remote_code in a judge": (_config(lambda c: c["evaluate"]["harmfulness"]["judges"][0]["params"].update(
        trust_remote_code=True)), ["config.evaluate.harmfulness.judges.0.params.trust_remote_code is True"]),
    "absolute run name": (_rename_run("/tmp/evil"), ["run_name", "'/tmp/evil' is not allowed"]),
    "run name with ..": (_rename_run("../../evil"), ["run_name", "'../../evil' is not allowed"]),
    "config model differs": (_config(lambda c: c["model"].update(ref="someone/custom-code-model")),
                             ["model.ref 'tiny-llama' differs", "'someone/custom-code-model'"]),
    "config defence params differ": (_config(lambda c: c["defence"]["params"].update(num_pairs=999)),
                                     ["defence.params", "differs from the recorded config"]),
    "config attack preset differs": (_config(lambda c: c["attack"].update(preset="cpu-8e-5-128")),
                                     ["attack.preset None differs", "'cpu-8e-5-128'"]),
    "config evaluator params differ": (_config(lambda c: c["evaluate"]["harmfulness"].update(num_prompts=300)),
                                       ["harmfulness.params differ from the recorded config's evaluate.harmfulness"]),
    "summary harm 0.0 over records of 1.0": (_forge_summary,
                                             ["results.defended.post_attack.harmfulness.metrics.refusal-keywords.mean",
                                              "claimed 0.0", "give 1.0", "records/defended-post_attack-harmfulness"]),
    "submitter-set degenerate: false": (_fluency_ok, ["harmfulness.metrics.fluency.degenerate", "claimed False",
                                                      "give True"]),
    "record score outside [0, 1]": (_bad_record_score, ["scores.refusal-keywords is 7.0, not a score in [0, 1]"]),
    "deeply nested results.json": (_deep("results"), ["results.json: JSON nested 200000 levels deep",
                                                      "limit of 64"]),
    "deeply nested manifest": (_deep("manifest"), ["manifest.json: JSON nested 200000 levels deep"]),
    "deeply nested records line": (_deep("records"), [".jsonl line 1: JSON nested 200000 levels deep"]),
    "config.json differs from the record": (_config_copy_differs, ["config.json differs from the config recorded"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_submissions_are_refused_naming_file_and_field(good, tmp_path, case):
    change, words = CASES[case]
    files = lf.unpack(good)
    change(files)
    bad = lf.repack(tmp_path / "bad.tar.gz", files, fix_manifest=case != "deeply nested manifest")
    with pytest.raises(SubmissionError) as info:
        add(bad, tmp_path / "board")
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not (tmp_path / "board" / "submissions").exists()  # nothing written


def test_the_cli_refuses_a_deep_file_cleanly(good, tmp_path):
    files = lf.unpack(good)
    _deep("results")(files)
    bad = lf.repack(tmp_path / "deep.tar.gz", files)
    result = runner.invoke(app, ["leaderboard", "add", str(bad), "--board", str(tmp_path / "board")])
    assert result.exit_code == 2 and "nested 200000 levels deep" in flat(result.output)
    assert "Traceback" not in result.output and "RecursionError" not in result.output


def test_an_honest_submission_with_forged_records_passes_intake_and_its_numbers_come_from_them(good, tmp_path):
    """Intake checks consistency, not truth: consistent records are accepted (verify re-runs them)."""
    files = lf.unpack(good)
    member = lf.forge_scores(files, 0.25)
    submission = open_submission(lf.repack(tmp_path / "consistent.tar.gz", files))
    assert submission.results[member]["summary"]["branches"]["defended"]["post_attack"]["harmfulness"]["mean"] == 0.25


def test_bounded_json_limits_and_messages():
    assert loads_bounded('{"a": "[[[[\\"[[", "b": [[1]]}', "x.json", max_depth=3) == {"a": '[[[["[[', "b": [[1]]}
    with pytest.raises(ResultsSchemaError, match=r"x.json: JSON nested 4 levels deep, over the limit of 3"):
        loads_bounded("[[[[1]]]]", "x.json", max_depth=3)
    with pytest.raises(ResultsSchemaError, match=r"x.json: 11 bytes of JSON, over the limit of 10 bytes"):
        loads_bounded(b'"abcdefghi"', "x.json", max_bytes=10)
    with pytest.raises(ResultsSchemaError, match="not valid JSON"):
        loads_bounded('"unterminated ' + "[" * 10, "x.json")


def test_add_a_directory_says_how_to_make_a_submission_file(grid_runs, tmp_path):
    result = runner.invoke(app, ["leaderboard", "add", str(grid_runs), "--board", str(tmp_path / "board")])
    out = flat(result.output)
    assert result.exit_code == 2 and "is a directory, not a submission file" in out
    assert f"harness submit {grid_runs}" in out and "no such file" not in out


def test_add_with_a_file_as_the_board_is_a_clear_error(good, tmp_path):
    board = tmp_path / "board.txt"
    board.write_text("not a board")
    result = runner.invoke(app, ["leaderboard", "add", str(good), "--board", str(board)])
    out = flat(result.output)
    assert result.exit_code == 2 and "is a file, not a directory" in out and "Traceback" not in result.output
    assert board.read_text() == "not a board"


def _with_capability(files, claimed: float, per_document=(1.0, 0.0, 1.0, 1.0)) -> str:
    """A capability evaluation of the defended model before the attack, with its per-document records."""
    member = lf.results_member(files)
    base = member.rsplit("/", 1)[0]
    rows = [{"task": "arc_easy_local", "doc_id": i, "target": 0, "pred": 0 if acc else 1, "acc": acc}
            for i, acc in enumerate(per_document)]
    files[f"{base}/records/defended-pre_attack-capability.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()

    def mutate(obj):
        obj["config"]["evaluate"]["capability"] = {}
        obj["results"]["defended"]["pre_attack"]["capability"] = {
            "key": "test", "params": {}, "info": {}, "records": "records/defended-pre_attack-capability.jsonl",
            "metrics": {"arc_easy_local": {"acc": claimed, "acc_stderr": None, "n": len(rows)}, "mean_acc": claimed}}
    return lf.edit_results(files, mutate)


def test_capability_numbers_are_recomputed_from_their_records(good, tmp_path):
    files = lf.unpack(good)
    member = _with_capability(files, 0.75)  # honest: 3 of 4 documents right
    submission = open_submission(lf.repack(tmp_path / "honest.tar.gz", files))
    headline = submission.results[member]["summary"]["branches"]["defended"]["pre_attack"]["headlines"]
    assert headline["capability"]["value"] == 0.75

    files = lf.unpack(good)
    _with_capability(files, 0.95)  # a capability drop hidden by a forged accuracy
    with pytest.raises(SubmissionError) as info:
        open_submission(lf.repack(tmp_path / "forged.tar.gz", files))
    message = str(info.value)
    assert "results.defended.pre_attack.capability.metrics.arc_easy_local.acc: claimed 0.95" in message
    assert "give 0.75" in message and "defended-pre_attack-capability.jsonl" in message
