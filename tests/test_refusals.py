"""`harness data refusals`: pairs from a QA set without refusals, kept only when the judge says safe."""

import json

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.data.readers import DataAccess
from harness.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_refusals(tmp_path, *extra):
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["data", "refusals", "--model", "tiny-llama", "--judge", "refusal-keywords",
                                      "--from", "jbb-harmful-qa", "--num", "4", "--max-new-tokens", "6",
                                      "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_judge_decides_what_is_kept(tmp_path):
    # tiny-llama never refuses, so the keyword judge calls every answer harmful: nothing is kept ...
    out, output = run_refusals(tmp_path)
    assert out.read_text() == "" and "0 of 4 refusals kept (4 judged harmful, 0 empty)" in output.replace("\n", " ")
    # ... unless the threshold lets everything through; then each pair keeps its source's harmful side.
    out, _ = run_refusals(tmp_path, "--max-harm", "1.01")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["harmless"] and r["harmful"] and r["judge_score"] == 1.0 for r in rows)


def test_written_pairs_load_as_a_data_set(tmp_path, data_dir):
    out, _ = run_refusals(tmp_path, "--max-harm", "1.01")
    access = DataAccess(data_dir, "advbench", 0)
    pairs = access.pairs(f"pairs-file:{out}")
    assert len(pairs) == 4 and all(p.source == "file:pairs.jsonl" for p in pairs)
    assert access.fingerprint(f"pairs-file:{out}") != access.fingerprint("jbb-pairs")
    with pytest.raises(DataError, match="does not exist"):
        access.pairs(f"pairs-file:{tmp_path / 'missing.jsonl'}")


def test_a_defence_trains_on_the_file_and_its_content_is_in_the_key(tmp_path, tiny_run_config):
    from harness.run.runner import execute

    out, _ = run_refusals(tmp_path, "--max-harm", "1.01")
    ref = f"pairs-file:{out}"
    config = tiny_run_config("defence.name=repnoise", f"defence.pairs={ref}", "defence.max_length=32",
                             "compare_undefended=false")
    results, _ = execute(config)
    assert results["stages"]["defend"]["info"]["repnoise_training"]["pairs"] == 4
    assert ref in results["data"]["fingerprints"]
    out.write_text(out.read_text().replace('"harmless": "', '"harmless": "No. ', 1))  # edit the data ...
    again, _ = execute(config)
    assert again["stages"]["defend"]["cached"] is False  # ... and the defence is recomputed
