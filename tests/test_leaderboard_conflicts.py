"""The board never lets one file silently replace another's numbers, never dies on one hostile file,
never deletes a directory it does not own, and prints user text literally (Rich markup is code)."""

import csv
import io
import json

import leaderboard_fixtures as lf
import pytest
from conftest import flat
from typer.testing import CliRunner

from harness.cli import app
from leaderboard import tables
from leaderboard.aggregate import build_board
from leaderboard.site import MARKER, build_site

runner = CliRunner()
WIDE = {"COLUMNS": "400"}  # so Rich does not shorten table cells


@pytest.fixture(scope="session")
def grid_runs(tmp_path_factory):
    return lf.grid(tmp_path_factory)


def lora_cell(board, defence: str):
    row = next(r for r in board.rows if r.defence == defence)
    return row, next(c for c in row.cells if c.attack_label == "lora")


@pytest.fixture
def forged_board(grid_runs, tmp_path):
    """An honest run and a forged copy of the same cell and seed: harm 0.0, a newer `created`."""
    source = lf.find_run(grid_runs, "repnoise", "lora", 1)
    root = tmp_path / "board"
    lf.copy_run(source, root, name="honest")

    def forge(obj):
        lf.set_harm(obj, 0.0, ci=(0.0, 0.0))
        obj["created"] = "2099-01-01T00:00:00Z"

    lf.copy_run(source, root, forge, name="forged")
    honest = json.loads((root / "honest" / "results.json").read_text())
    return root, honest["summary"]["branches"]["defended"]["post_attack"]["harmfulness"]["mean"]


def test_a_conflicting_copy_is_kept_shown_and_cannot_lower_the_harm(forged_board):
    root, honest = forged_board
    assert honest > 0.5  # the tiny model's answers all score harmful
    board = build_board([root])
    row, cell = lora_cell(board, "repnoise")
    assert cell.post.mean == pytest.approx(honest)  # the worse value, not the newest file's
    assert len(cell.observations) == 2 and [o.path.parent.name for o in cell.runs] == ["honest"]
    (conflict,) = cell.conflicts
    assert "seed 1: 2 differing results" in conflict and "0.000 in" in conflict and "the highest harm" in conflict
    assert row.conflicts == [f"lora: {conflict}"]

    md = tables.render(board, "md")
    assert "conflicts" in md and "2 differing results" in md and "Conflict (≠)" in md
    (rec,) = [r for r in csv.DictReader(io.StringIO(tables.render(board, "csv"))) if r["defence"] == "repnoise"]
    assert "2 differing results" in rec["conflicts"]
    doc = json.loads(tables.render(board, "json"))
    (cell_json,) = [c for r in doc["rows"] for c in r["cells"] if r["defence"] == "repnoise" and c["attack"] == "lora"]
    assert cell_json["conflicts"] == [conflict]
    assert sorted((o["post_harm"], o["used"]) for o in cell_json["observations"]) == [(0.0, False),
                                                                                      (round(honest, 4), True)]


def test_conflicts_show_in_the_terminal_and_on_the_site(forged_board, tmp_path):
    root, _ = forged_board
    result = runner.invoke(app, ["leaderboard", "show", str(root)], env=WIDE)
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "repnoise ≠" in out and "conflict: lora: seed 1: 2 differing results" in out
    site = build_site(build_board([root]), tmp_path / "site")
    pages = "".join(p.read_text() for p in site.glob("*.html"))
    assert "≠ conflict</span>: lora: seed 1: 2 differing results" in pages
    assert "seed 1: 2 differing results" in (site / "index.html").read_text()


def test_identical_copies_are_not_a_conflict(grid_runs, tmp_path):
    source = lf.find_run(grid_runs, "repnoise", "lora", 1)
    for name in ("a", "b"):
        lf.copy_run(source, tmp_path / "board", name=name)
    _, cell = lora_cell(build_board([tmp_path / "board"]), "repnoise")
    assert cell.conflicts == [] and cell.notes == [] and len(cell.runs) == 1 and len(cell.observations) == 2


def test_a_direct_run_beats_a_reference_branch_and_a_difference_is_noted(grid_runs, tmp_path):
    root = lf.controlled_board(grid_runs, tmp_path / "board", {("none", "lora", 1): 0.8, ("repnoise", "lora", 1): 0.3})
    board = build_board([root])
    _, cell = lora_cell(board, "none")
    assert cell.post.mean == pytest.approx(0.8) and [o.branch for o in cell.runs] == ["defended"]
    assert cell.conflicts == []
    (note,) = cell.notes
    assert "seed 1: the reference run in" in note and "(undefended branch) measured 1.000, the direct run 0.800" in note
    assert any(line.startswith("Note: in 1 cell(s) the undefended reference") for line in tables.notes(board))
    (cell_json,) = [c for r in json.loads(tables.render(board, "json"))["rows"] for c in r["cells"]
                    if r["defence"] == "none"]
    assert cell_json["notes"] == [note]


def test_show_lists_a_deeply_nested_file_as_skipped_and_goes_on(forged_board):
    root, _ = forged_board
    (root / "deep").mkdir()
    (root / "deep" / "results.json").write_text("[" * 200_000 + "]" * 200_000)
    result = runner.invoke(app, ["leaderboard", "show", str(root)], env=WIDE)
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "Skipped" in out and "nested 200000 levels deep, over the limit of 64" in out and "repnoise" in out
    assert "RecursionError" not in out


def test_build_never_deletes_a_directory_it_did_not_build(forged_board, tmp_path):
    root, _ = forged_board
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.html").write_text("<p>my notes</p>")
    result = runner.invoke(app, ["leaderboard", "build", str(root), "--out", str(notes)])
    assert result.exit_code == 2 and "not built by `harness leaderboard build`" in flat(result.output)
    assert (notes / "notes.html").read_text() == "<p>my notes</p>" and not (notes / "index.html").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    for _ in range(2):  # an empty directory is fine, and a site it built is replaced
        result = runner.invoke(app, ["leaderboard", "build", str(root), "--out", str(empty)])
        assert result.exit_code == 0, result.output
        assert (empty / MARKER).is_file() and (empty / "index.html").is_file()


MARKUP = "[bold]x[/bold]"


def test_the_cli_prints_names_and_paths_literally(grid_runs, tmp_path):
    root = tmp_path / "board"
    lf.copy_run(lf.find_run(grid_runs, "repnoise", "lora", 1), root, lambda o: lf.rename_defence(o, MARKUP))
    lf.copy_run(lf.find_run(grid_runs, "repnoise", "full-ft", 1), root, lambda o: lf.rename_defence(o, "[/]"))
    broken = root / "[/]" / MARKUP
    broken.mkdir(parents=True)
    (broken / "results.json").write_text("{")

    result = runner.invoke(app, ["leaderboard", "show", str(root)], env=WIDE)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert MARKUP in result.output and " [/] " in result.output
    assert f"Skipped {broken}/results.json" in flat(result.output)

    missing = tmp_path / MARKUP / "[/].tar.gz"
    result = runner.invoke(app, ["leaderboard", "add", str(missing), "--board", str(tmp_path / "b")], env=WIDE)
    assert result.exit_code == 2 and f"{missing}: no such file" in flat(result.output), result.output

    site = tmp_path / "[/]site" / MARKUP
    result = runner.invoke(app, ["leaderboard", "build", str(root), "--out", str(site)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"Site: {site}/index.html" in flat(result.output)
