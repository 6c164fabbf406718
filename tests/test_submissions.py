"""Submissions: `harness submit` packages real runs; `harness leaderboard add` accepts a good one once
and rejects broken or malicious ones with a clear message; `verify` re-runs a cell and compares."""

import json
import pickle

import leaderboard_fixtures as lf
import pytest
from conftest import flat
from typer.testing import CliRunner

from harness.cli import app
from leaderboard.aggregate import build_board
from leaderboard.archive import SubmissionError
from leaderboard.intake import add, open_submission
from leaderboard.package import MANIFEST, package, sha256

runner = CliRunner()


@pytest.fixture(scope="session")
def grid_runs(tmp_path_factory):
    return lf.grid(tmp_path_factory)


@pytest.fixture(scope="session")
def good(grid_runs, tmp_path_factory):
    path, _ = package(grid_runs, tmp_path_factory.mktemp("submission") / "good.tar.gz")
    return path


unpack, repack = lf.unpack, lf.repack


def edit_results(files: dict[str, bytes], mutate, refresh: bool = True) -> str:
    return lf.edit_results(files, mutate, refresh)


def test_submit_packages_results_configs_generations_and_plugin_reference(good, grid_runs, tmp_path):
    files = unpack(good)
    manifest = json.loads(files.pop(MANIFEST))
    assert manifest["format"] == "harness-submission" and len(manifest["runs"]) == 8
    assert manifest["files"] == {name: sha256(data) for name, data in files.items()}
    for run in manifest["runs"]:
        base = run["results"].rsplit("/", 1)[0]
        assert {f"{base}/results.json", f"{base}/config.json"} <= set(files)
        assert any(n.startswith(f"{base}/records/") and n.endswith(".jsonl") for n in files)
    repnoise = next(d for d in manifest["defences"] if d["name"] == "repnoise")
    assert repnoise["module"] == "defences.repnoise" and repnoise["plugin_version"]
    assert repnoise["distribution"]["name"] == "harmful-ft-harness" and repnoise["builtin"] is True
    assert all(not n.startswith("/") and ".." not in n for n in files)
    again, manifest_again = package(grid_runs, tmp_path / "again.tar.gz")
    assert manifest_again["id"] == manifest["id"]  # content-addressed: same runs, same id


def test_a_good_submission_is_added_once_and_shows_on_the_board(good, tmp_path):
    board = tmp_path / "board"
    result = runner.invoke(app, ["leaderboard", "add", str(good), "--board", str(board)])
    assert result.exit_code == 0 and "Added" in flat(result.output), result.output
    result = runner.invoke(app, ["leaderboard", "add", str(good), "--board", str(board)])
    assert result.exit_code == 0 and "already on the board" in flat(result.output)
    assert len(list((board / "submissions").iterdir())) == 1
    rows = build_board([board]).rows
    assert sorted(r.defence for r in rows) == ["none", "repnoise"]
    assert all(len(r.cells) == 2 and r.seeds == [1, 2] for r in rows)


def _schema(files):
    edit_results(files, lambda o: o["model"].pop("fingerprint"), refresh=False)


def _implausible(files):
    edit_results(files, lambda o: lf.set_harm(o, 1.5))


def _tamper(files):
    name = next(n for n in sorted(files) if n.endswith("/results.json"))
    files[name] = files[name] + b" "  # any change after packaging


def _script_name(files):
    name = edit_results(files, lambda o: lf.rename_defence(o, "<script>alert(1)</script>"))
    manifest = json.loads(files[MANIFEST])
    for d in manifest["defences"]:
        if d["name"] == "repnoise":
            d["name"] = "<script>alert(1)</script>"
    files[MANIFEST] = json.dumps(manifest).encode()
    return name


def _add(name: str, data: bytes):
    def change(files):
        files[name] = data
    return change


CASES = {
    "bad schema": (_schema, True, "model.fingerprint: missing required field"),
    "implausible harm": (_implausible, True, "mean: 1.5 is above 1"),
    "tampered checksum": (_tamper, False, "checksum mismatch"),
    "path traversal": (_add("runs/../../evil.json", b"{}"), True, "path traversal"),
    "absolute path": (_add("/tmp/evil.json", b"{}"), True, "absolute"),
    "script in a defence name": (_script_name, True, "is not a safe name"),
    "pickle by suffix": (_add("runs/weights.pkl", pickle.dumps({"a": 1})), True, "pickled/binary payloads"),
    "pickle by magic bytes": (_add("runs/notes.json", pickle.dumps({"a": 1}, protocol=4)), True,
                              "is a pickle; pickled payloads are not accepted"),
    "torch zip": (_add("runs/notes.txt", b"PK\x03\x04rest"), True, "zip archive"),
    "unlisted file": (_add("runs/extra.json", b"{}"), False, "not listed"),
    "odd file type": (_add("runs/run.sh", b"echo hi"), True, "file type not allowed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_or_malicious_submissions_are_rejected_with_a_clear_message(good, tmp_path, case):
    change, fix_manifest, message = CASES[case]
    files = unpack(good)
    change(files)
    bad = repack(tmp_path / "bad.tar.gz", files, fix_manifest)
    with pytest.raises(SubmissionError if case not in ("bad schema", "implausible harm") else Exception) as info:
        add(bad, tmp_path / "board")
    assert message in str(info.value), str(info.value)
    assert not (tmp_path / "board" / "submissions").exists()  # nothing written


def test_symlinks_and_missing_manifests_are_rejected(good, tmp_path):
    files = unpack(good)
    linked = repack(tmp_path / "link.tar.gz", files, links={"runs/passwd.json": "/etc/passwd"})
    with pytest.raises(SubmissionError, match="is a symlink"):
        open_submission(linked)
    files.pop(MANIFEST)
    with pytest.raises(SubmissionError, match="no manifest.json"):
        open_submission(repack(tmp_path / "none.tar.gz", files, fix_manifest=False))
    (tmp_path / "not.tar.gz").write_bytes(b"plain text")
    with pytest.raises(SubmissionError, match="not a readable .tar.gz"):
        open_submission(tmp_path / "not.tar.gz")


def test_size_limits(good):
    with pytest.raises(SubmissionError, match="over the per-file limit of 1000 bytes"):
        open_submission(good, max_file_bytes=1000)
    with pytest.raises(SubmissionError, match="files total more than 20000 bytes"):
        open_submission(good, max_total_bytes=20_000)


def test_the_cli_rejects_with_exit_2_and_one_message(good, tmp_path):
    files = unpack(good)
    files["runs/../escape.json"] = b"{}"
    bad = repack(tmp_path / "bad.tar.gz", files)
    result = runner.invoke(app, ["leaderboard", "add", str(bad), "--board", str(tmp_path / "board")])
    assert result.exit_code == 2 and "path traversal" in flat(result.output) and "Traceback" not in result.output


@pytest.fixture(scope="session")
def single(grid_runs, tmp_path_factory):
    """A submission of one cheap cell: no defence, LoRA, seed 1."""
    run_dir = lf.find_run(grid_runs, "none", "lora", 1).parent
    path, _ = package(run_dir, tmp_path_factory.mktemp("single") / "single.tar.gz")
    return path


def test_verify_reruns_a_submitted_cell_and_passes_exactly_on_cpu(single, tmp_path):
    result = runner.invoke(app, ["leaderboard", "verify", str(single), "--cell", "0", "--tolerance", "0",
                                 "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "PASS: all" in out and "within 0" in out and "model fingerprint" in out
    assert list((tmp_path / "runs").glob("*/results.json"))  # the re-run is a real run


def test_verify_fails_when_the_submitted_numbers_were_changed(single, tmp_path):
    files = unpack(single)
    lf.forge_scores(files, 0.25, match="__none__lora__seed1__")  # records and metrics agree: intake accepts it
    forged = repack(tmp_path / "forged.tar.gz", files)
    assert open_submission(forged)
    result = runner.invoke(app, ["leaderboard", "verify", str(forged), "--cache-dir", str(tmp_path / "cache"),
                                 "--output-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1, result.output
    out = flat(result.output)
    assert "FAIL" in out and "(first: defended.post_attack.harmfulness.refusal-keywords.mean)" in out


def test_verify_names_the_cells_when_the_index_is_wrong(single):
    result = runner.invoke(app, ["leaderboard", "verify", str(single), "--cell", "3"])
    assert result.exit_code == 2
    assert "No cell 3 in this submission; it has 1: 0: none / lora / seed 1" in flat(result.output)


def test_verify_says_which_package_to_install_for_an_unknown_defence(single, tmp_path):
    files = unpack(single)
    lf.edit_results(files, lambda o: lf.rename_defence(o, "shield"), match="__none__lora__seed1__")
    manifest = json.loads(files[MANIFEST])
    manifest["defences"] = [{"name": "shield", "module": "my_shield.shield", "entry_point": "shield = my_shield.shield",
                             "distribution": {"name": "my-shield", "version": "0.1.0"}}]
    files[MANIFEST] = json.dumps(manifest).encode()
    result = runner.invoke(app, ["leaderboard", "verify", str(repack(tmp_path / "s.tar.gz", files))])
    assert result.exit_code == 2
    assert "Defence 'shield' is not installed here. Install my-shield==0.1.0" in flat(result.output)
