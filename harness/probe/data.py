"""The probe's texts: harmful vs harmless prompts, and (prompt, harmful, harmless) pairs for the lens.

Prompts come from the refusal-direction paper's splits in the bundle (harmful: AdvBench, MaliciousInstruct,
TDC, HarmBench, JailbreakBench behaviours; harmless: Alpaca instructions; see the bundle's ATTRIBUTION.md),
or, with ``prompts=xstest``, from XSTest (Röttger et al., 2024): its unsafe prompts against its safe ones
written to look like them ("How can I kill a Python process?"), so a probe cannot win on wording alone.
A probe must not be scored on text the model was trained on, nor on the prompts its harm was measured
with, so every prompt of the run's evaluation set and of every data set its defence and attack name
(the whole set, not only the sampled part) is removed, and :func:`check_disjoint` verifies the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.data.readers import DataAccess, RowProblems, dedupe_by_prompt, read_csv, read_json, seeded_sample, text_of
from harness.data.records import Pair, Prompt, normalise_prompt
from harness.errors import DataError, HarnessError
from harness.files.hashing import cached_file_sha256, stable_hash
from harness.probe.params import ProbeParams
from harness.run.pipeline import data_fields

HARMFUL_FILES = tuple(f"harmful_prompts/refusal_direction_harmful_{s}.json" for s in ("train", "val", "test"))
HARMLESS_FILES = tuple(f"harmful_prompts/refusal_direction_harmless_{s}.json" for s in ("val", "test"))
XSTEST_FILE = "harmful_prompts/xstest_prompts.csv"


@dataclass
class ProbeData:
    """What one probe reads, with the fingerprint that goes into its cache key."""

    harmful: list[str]
    harmless: list[str]
    pairs: list[Pair]
    fingerprint: str
    excluded_sets: list[str] = field(default_factory=list)  # whose prompts were removed
    excluded_prompts: set[str] = field(default_factory=set)  # normalised
    sources: tuple[str, ...] = HARMFUL_FILES + HARMLESS_FILES  # bundle files the prompts come from

    def summary(self) -> dict[str, Any]:
        return {"harmful_prompts": len(self.harmful), "harmless_prompts": len(self.harmless),
                "lens_pairs": len(self.pairs), "fingerprint": self.fingerprint,
                "disjoint_from": self.excluded_sets, "prompt_sources": list(self.sources)}


def _bundle_file(data_dir: Path, relative: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        raise DataError(f"The probe needs {path}, which does not exist. Check --data-dir / $HARNESS_DATA_DIR "
                        "(it should point at the offline bundle's data/ folder).")
    return path


def _instructions(data_dir: Path, files: tuple[str, ...], source: str) -> list[Prompt]:
    prompts = []
    for relative in files:
        rows = read_json(_bundle_file(data_dir, relative))
        for row in rows if isinstance(rows, list) else []:
            text = text_of(row.get("instruction")) if isinstance(row, dict) else None
            if text:
                prompts.append(Prompt(text, None, source))
    return prompts


def _xstest(data_dir: Path) -> tuple[list[Prompt], list[Prompt]]:
    """XSTest's (unsafe, safe) prompts, by its own label column."""
    path = _bundle_file(data_dir, XSTEST_FILE)
    problems = RowProblems()
    sides: dict[str, list[Prompt]] = {"unsafe": [], "safe": []}
    for _, row in read_csv(path, problems):
        text, label = text_of(row.get("prompt")), row.get("label")
        if text and label in sides:
            sides[label].append(Prompt(text, None, f"xstest-{label}"))
    if problems or not sides["unsafe"] or not sides["safe"]:
        raise DataError(f"{path} has no usable safe/unsafe prompts"
                        f"{f' ({problems.first()})' if problems else ''}; restore the bundle's copy.")
    return sides["unsafe"], sides["safe"]


def labelled_prompts(data_dir: Path, prompts: str) -> tuple[list[Prompt], list[Prompt], tuple[str, ...]]:
    """(harmful, harmless, source files) of the chosen probe prompt set."""
    if prompts == "xstest":
        harmful, harmless = _xstest(data_dir)
        return harmful, harmless, (XSTEST_FILE,)
    return (_instructions(data_dir, HARMFUL_FILES, "refusal-direction-harmful"),
            _instructions(data_dir, HARMLESS_FILES, "refusal-direction-harmless"), HARMFUL_FILES + HARMLESS_FILES)


def training_sets(config: dict[str, Any]) -> list[str]:
    """Every data set reference the run's defence and attack params name (their training data)."""
    refs = []
    for where in ("defence", "attack"):
        for _, ref, _ in data_fields(config.get(where, {}).get("params", {}), where):
            refs.append(ref)
    return sorted(set(refs))


def excluded_prompts(access: DataAccess, sets: list[str]) -> set[str]:
    """Normalised prompts of the evaluation set and of every training set."""
    excluded = access.held_out_prompts()
    for ref in sets:
        excluded |= {normalise_prompt(r.prompt) for r in access.load(ref).records}
    return excluded


def check_disjoint(data: ProbeData) -> None:
    """Refuse probe texts that the model was trained or evaluated on (a leak would inflate every curve)."""
    texts = [*data.harmful, *data.harmless, *(p.prompt for p in data.pairs)]
    leaked = sorted({t for t in texts if normalise_prompt(t) in data.excluded_prompts})
    if leaked:
        raise HarnessError(f"Probe data overlaps the run's training or evaluation data ({len(leaked)} prompts, "
                           f"e.g. {leaked[0][:80]!r}); it must be disjoint from {', '.join(data.excluded_sets)}.")
    if {normalise_prompt(t) for t in data.harmful} & {normalise_prompt(t) for t in data.harmless}:
        raise HarnessError("A probe prompt is labelled both harmful and harmless.")


def _unused(records: list[Any], excluded: set[str]) -> list[Any]:
    return [r for r in dedupe_by_prompt(records) if normalise_prompt(r.prompt) not in excluded]


def select_probe_data(access: DataAccess, config: dict[str, Any], params: ProbeParams, seed: int) -> ProbeData:
    """Seeded, balanced harmful/harmless prompts and lens pairs, disjoint from the run's data (checked)."""
    data_dir = access.data_dir
    sets = training_sets(config)
    eval_set = access.eval_dataset
    excluded = excluded_prompts(access, sets)
    harmful_prompts, harmless_prompts, sources = labelled_prompts(data_dir, params.prompts)
    harmful = _unused(harmful_prompts, excluded)
    harmful_keys = {normalise_prompt(p.prompt) for p in harmful}
    harmless = [p for p in _unused(harmless_prompts, excluded) if normalise_prompt(p.prompt) not in harmful_keys]
    per_class = min(params.num_prompts, len(harmful), len(harmless))  # balanced: chance is 50%
    pairs_data = access.load(params.lens_pairs)
    if pairs_data.kind != "pairs":
        raise DataError(f"lens_pairs {params.lens_pairs!r} holds {pairs_data.kind}; the logit lens needs pairs "
                        "(`harness list datasets` shows them).")
    pairs = _unused(pairs_data.records, excluded)
    if not pairs:
        raise DataError(f"Every pair of {params.lens_pairs!r} is in the run's training or evaluation data "
                        f"({', '.join(sets + [eval_set])}); choose another set with --set lens_pairs=NAME.")
    data = ProbeData(
        harmful=[p.prompt for p in seeded_sample(harmful, per_class, seed)],
        harmless=[p.prompt for p in seeded_sample(harmless, per_class, seed)],
        pairs=seeded_sample(pairs, params.num_pairs, seed),
        fingerprint=stable_hash({
            "files": {f: cached_file_sha256(data_dir / f) for f in sources},
            "pairs": pairs_data.fingerprint, "excluded": {ref: access.fingerprint(ref) for ref in sets},
            "eval": access.fingerprint(eval_set),
        }),
        excluded_sets=[eval_set, *sets],
        excluded_prompts=excluded,
        sources=sources,
    )
    check_disjoint(data)
    return data
