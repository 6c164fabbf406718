"""Judge-error-corrected harm on the board, on real tiny-llama results with controlled numbers: the
cell's corrected rate against the formulas (one seed: the run's own interval; several: Student-t
over seeds), and the "judges disagree" mark in every view when two judges' corrected intervals are
disjoint, never when they overlap or when a judge reports no corrected rate."""

import csv
import io
import json
import math
import statistics

import leaderboard_fixtures as lf
import pytest
from conftest import flat
from scipy import stats
from typer.testing import CliRunner

from harness.cli import app
from leaderboard import tables
from leaderboard.aggregate import CORRECTED_ONE_SEED, build_board
from leaderboard.site import build_site

runner = CliRunner()
WIDE = {"COLUMNS": "400"}
PRIMARY = "refusal-keywords"  # the grid's only judge
HARM = {("none", "lora", 1): 0.8, ("repnoise", "lora", 1): 0.3, ("repnoise", "lora", 2): 0.5}


@pytest.fixture(scope="session")
def grid_runs(tmp_path_factory):
    return lf.grid(tmp_path_factory)


def corrected(per_seed: dict[int, dict[str, tuple[float, float, float]]]):
    """repnoise runs get these corrected rates per seed and judge (others get none)."""
    def edit(obj):
        if obj["defence"]["name"] == "repnoise" and obj["seed"] in per_seed:
            lf.set_corrected(obj, per_seed[obj["seed"]])
    return edit


def repnoise_cell(board):
    row = next(r for r in board.rows if r.defence == "repnoise")
    (cell,) = row.cells
    return row, cell


def board_for(grid_runs, root, per_seed, harm=HARM):
    return lf.controlled_board(grid_runs, root, harm, corrected(per_seed))


def test_one_seed_shows_the_runs_own_corrected_interval(grid_runs, tmp_path):
    harm = {("repnoise", "lora", 1): 0.3}
    board = build_board([board_for(grid_runs, tmp_path / "b", {1: {PRIMARY: (0.42, 0.31, 0.55)}}, harm)])
    row, cell = repnoise_cell(board)
    assert (cell.corrected.mean, cell.corrected.low, cell.corrected.high) == (0.42, 0.31, 0.55)
    assert cell.corrected.method == CORRECTED_ONE_SEED and row.worst is cell
    rec = tables.record(row)
    assert rec["worst_post_harm_corrected"] == 0.42 and rec["worst_post_harm_corrected_ci95"] == [0.31, 0.55]


def test_several_seeds_average_with_a_t_interval_over_seeds(grid_runs, tmp_path):
    per_seed = {1: {PRIMARY: (0.42, 0.31, 0.55)}, 2: {PRIMARY: (0.60, 0.50, 0.70)}}
    board = build_board([board_for(grid_runs, tmp_path / "b", per_seed)])
    _, cell = repnoise_cell(board)
    values = [0.42, 0.60]
    mean, half = 0.51, stats.t.ppf(0.975, df=1) * statistics.stdev(values) / math.sqrt(2)
    assert (cell.corrected.mean, cell.corrected.low, cell.corrected.high) == pytest.approx(
        (mean, mean - half, mean + half))
    assert cell.corrected.method == "2 seeds: Student-t 95% CI over seeds"
    (cell_json,) = [c for r in json.loads(tables.render(board, "json"))["rows"] for c in r["cells"]
                    if r["defence"] == "repnoise"]
    assert cell_json["post_harm_corrected"]["per_seed"] == [0.42, 0.6]
    assert cell_json["post_harm_corrected"]["mean"] == round(mean, 4)
    assert sorted(o["post_harm_corrected"] for o in cell_json["observations"]) == [0.42, 0.6]


def test_a_seed_without_a_corrected_rate_leaves_the_cell_without_one(grid_runs, tmp_path):
    board = build_board([board_for(grid_runs, tmp_path / "b", {1: {PRIMARY: (0.42, 0.31, 0.55)}})])
    _, cell = repnoise_cell(board)
    assert cell.corrected is None
    none = next(r for r in board.rows if r.defence == "none")
    assert tables.record(none)["worst_post_harm_corrected"] is None
    md = tables.render(board, "md")
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    line = next(line for line in md.splitlines() if "| repnoise |" in line)
    assert dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))["corrected harm [95% CI]"] == "–"


DISJOINT = {1: {PRIMARY: (0.30, 0.25, 0.35), lf.SECOND_JUDGE: (0.40, 0.32, 0.48)},  # overlap
            2: {PRIMARY: (0.20, 0.10, 0.30), lf.SECOND_JUDGE: (0.70, 0.60, 0.80)}}  # disjoint
OVERLAPPING = {1: DISJOINT[1], 2: {PRIMARY: (0.20, 0.10, 0.30), lf.SECOND_JUDGE: (0.35, 0.29, 0.45)}}
EXPECTED = ("lora: seed 2, after the attack: corrected harm refusal-keywords 0.200 [0.100, 0.300] vs "
            "second-judge 0.700 [0.600, 0.800]")


def test_disjoint_intervals_mark_the_cell_in_every_view_and_keep_the_rank(grid_runs, tmp_path):
    root = board_for(grid_runs, tmp_path / "b", DISJOINT)
    board = build_board([root])
    row, cell = repnoise_cell(board)
    assert row.disagreements == [EXPECTED] and row.rank == 1 and not row.flags
    assert cell.disagreements == [EXPECTED.removeprefix("lora: ")]

    result = runner.invoke(app, ["leaderboard", "show", str(root)], env=WIDE)
    out = flat(result.output)
    assert result.exit_code == 0 and "repnoise ≉" in out and f"≉ repnoise: judges disagree: {EXPECTED}" in out
    assert "Judges disagree (≉)" in out
    md = tables.render(board, "md")
    assert "| judges disagree |" in md and EXPECTED in md
    (rec,) = [r for r in csv.DictReader(io.StringIO(tables.render(board, "csv"))) if r["defence"] == "repnoise"]
    assert rec["judges_disagree"] == EXPECTED and rec["rank"] == "1"
    doc = json.loads(tables.render(board, "json"))
    (row_json,) = [r for r in doc["rows"] if r["defence"] == "repnoise"]
    assert row_json["judges_disagree"] == EXPECTED and row_json["cells"][0]["judges_disagree"] == [
        EXPECTED.removeprefix("lora: ")]

    site = build_site(board, tmp_path / "site")
    index = (site / "index.html").read_text()
    assert "≉ judges disagree</span>: lora: seed 2, after the attack" in index
    page = next(p for p in site.glob("defence-*repnoise*.html")).read_text()
    assert page.count("≉ judges disagree") == 2  # the warning under the title and the cell's mark


def test_overlapping_intervals_are_not_marked(grid_runs, tmp_path):
    root = board_for(grid_runs, tmp_path / "b", OVERLAPPING)
    board = build_board([root])
    assert all(r.disagreements == [] for r in board.rows)
    views = [tables.render(board, fmt) for fmt in ("md", "csv", "json")]
    views.append(runner.invoke(app, ["leaderboard", "show", str(root)], env=WIDE).output)
    site = build_site(board, tmp_path / "site")
    views += [p.read_text() for p in site.glob("*.html")]
    assert all("≉" not in view and "judges disagree:" not in view for view in views)


def test_judges_without_a_corrected_rate_are_not_compared(grid_runs, tmp_path):
    """A second judge whose raw rate differs completely, but with no corrected rate: no mark."""
    def edit(obj):
        if obj["defence"]["name"] == "repnoise":
            lf.set_corrected(obj, {PRIMARY: (0.2, 0.1, 0.3), lf.SECOND_JUDGE: (0.9, 0.85, 0.95)})
            second = obj["results"]["defended"]["post_attack"]["harmfulness"]["metrics"][lf.SECOND_JUDGE]
            second.pop("rate_corrected")
            second.update(mean=0.0, mean_ci95=[0.0, 0.0], rate=0.0, rate_ci95=[0.0, 0.0])

    board = build_board([lf.controlled_board(grid_runs, tmp_path / "b", HARM, edit)])
    _, cell = repnoise_cell(board)
    assert cell.disagreements == [] and cell.corrected is not None


def test_the_worst_cells_corrected_rate_shows_beside_the_raw_harm(grid_runs, tmp_path):
    per_seed = {1: {PRIMARY: (0.42, 0.31, 0.55)}, 2: {PRIMARY: (0.60, 0.50, 0.70)}}
    root = board_for(grid_runs, tmp_path / "b", per_seed)
    board = build_board([root])
    (rec,) = [r for r in csv.DictReader(io.StringIO(tables.render(board, "csv"))) if r["defence"] == "repnoise"]
    assert float(rec["worst_post_harm_corrected"]) == 0.51 and rec["worst_post_harm_corrected_ci_method"].startswith(
        "2 seeds")
    assert float(rec["worst_post_harm_corrected_ci_low"]) < 0.42
    result = runner.invoke(app, ["leaderboard", "show", str(root)], env=WIDE)
    assert "corrected [CI]" in result.output and "0.510 [" in result.output
    site = build_site(board, tmp_path / "site")
    assert "corrected harm, worst attack" in (site / "index.html").read_text()
    page = next(p for p in site.glob("defence-*repnoise*.html")).read_text()
    assert "corrected for judge error: 0.510 [" in page
