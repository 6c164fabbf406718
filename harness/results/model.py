"""results.json as typed pydantic models: the one source of its shape.

The shipped JSON Schema (``harness/results/schemas/results-v2.schema.json``, for tools outside Python) is
generated from these models (``python -m harness.results.model`` rewrites it; a test fails when it
is stale), and :func:`harness.results.schema.validate_results` validates with them. Strict on the
provenance every result must carry (DESIGN.md §6); open inside metrics, info and params, and at
every level for fields added later, so evaluators and plugins can add their own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION = 2
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = Path(__file__).parent / "schemas" / f"results-v{SCHEMA_VERSION}.schema.json"

Text = Annotated[str, StringConstraints(min_length=1)]
Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Interval = Annotated[list[Fraction], Field(min_length=2, max_length=2)]
Count = Annotated[int, Field(ge=0)]
Open = dict[str, Any]  # params, metrics and info: each plugin's own fields


class Block(BaseModel):
    """Every object in results.json: types checked strictly (no "7" for 7), later fields allowed."""

    model_config = ConfigDict(strict=True, extra="allow")


class ModelRef(Block):
    ref: Text
    revision: str | None
    fingerprint: Text
    dtype: str
    device: str


class Plugin(Block):
    name: Text
    params: Open
    preset: str | None = None


class AttackRef(Plugin):
    threat_model: Text


class DataRef(Block):
    dir: str | None = None
    eval_prompts: Text
    prompt_format: Text
    fingerprints: Annotated[dict[str, Text], Field(min_length=1)]


class Evaluation(Block):
    """One evaluator's output; ``records`` is the per-item JSONL beside results.json."""

    params: Open
    metrics: Open
    info: Open
    records: str


class ValidationCounts(Block):
    __pydantic_extra__: dict[str, Count] = Field(init=False)
    tp: Count
    fn: Count
    tn: Count
    fp: Count


class RateCorrected(Block):
    """The harm rate corrected for the judge's measured sensitivity and specificity (Rogan–Gladen)."""

    rate: Fraction
    rate_ci95: Interval
    sensitivity: Fraction
    specificity: Fraction
    validation_counts: ValidationCounts
    method: Text


class JudgeScores(Block):
    """One judge's harm numbers, stored under the judge's name inside the harmfulness metrics."""

    mean: Fraction
    mean_ci95: Interval
    rate: Fraction
    rate_ci95: Interval
    n: Annotated[int, Field(ge=1)]
    rate_corrected: RateCorrected | None = None


class HarmMetrics(Block):
    """Each judge's :class:`JudgeScores` sit under its name; JSON Schema cannot key on a value, so
    ``validate_results`` checks them against :class:`JudgeScores` itself."""

    primary_judge: Text
    empty_response_rate: Fraction | None = None


class JudgeDescription(Block):
    name: str
    version: Any


class Generation(Block):
    max_new_tokens: Any
    do_sample: Any


class HarmInfo(Block):
    judges: Annotated[dict[str, JudgeDescription], Field(min_length=1)]
    primary_judge: Text
    generation: Generation


class Harmfulness(Evaluation):
    metrics: HarmMetrics
    info: HarmInfo


class Phase(Block):
    """The evaluations of one model state, by evaluator name."""

    __pydantic_extra__: dict[str, Evaluation] = Field(init=False)
    harmfulness: Harmfulness | None = None


class Branch(Block):
    defence: Text
    pre_attack: Phase
    post_attack: Phase


class Branches(Block):
    """``defended`` always; ``undefended`` (the reference) when the run measured it."""

    __pydantic_extra__: dict[str, Branch] = Field(init=False)
    defended: Branch


class Stage(Block):
    kind: Text
    key: Text
    plugin: Text
    params: Open


class Stages(Block):
    __pydantic_extra__: dict[str, Stage] = Field(init=False)
    defend: Stage
    attack: Stage


class Compute(Block):
    wall_seconds_this_run: Amount
    wall_seconds_all_stages: Amount
    train_tokens: Count
    peak_memory_mb: Amount
    gpu_hours: Amount


class Libraries(Block):
    __pydantic_extra__: dict[str, str | None] = Field(init=False)
    python: str | None
    harness: str | None
    torch: str | None
    transformers: str | None


class RecordedConfig(Block):
    """The run's config as given (``RunConfig``), checked here only where results are read from it."""

    model: Any
    data: Any
    defence: Plugin
    attack: Plugin
    evaluate: Annotated[dict[str, Any], Field(min_length=1)]
    seed: int


class JudgeBlock(Block):
    """The primary harmfulness judge of the defended model's post-attack evaluation."""

    name: Text
    version: str | int | None
    accuracy: Fraction | None
    roc_auc: Fraction | None = None
    sensitivity: Fraction | None = None
    specificity: Fraction | None = None
    loso_worst_roc_auc: Fraction | None = None
    loso_mean_roc_auc: Fraction | None = None
    accuracy_source: str


class HarmSummary(JudgeScores):
    """The primary judge's scores, named."""

    judge: Text


class Headline(Block):
    metric: str | None
    value: float | None


class PhaseSummary(Block):
    harmfulness: HarmSummary | None
    headlines: dict[str, Headline]


class BranchSummary(Block):
    defence: Text
    pre_attack: PhaseSummary
    post_attack: PhaseSummary


class BranchSummaries(Block):
    __pydantic_extra__: dict[str, BranchSummary] = Field(init=False)
    defended: BranchSummary


class Summary(Block):
    """Derived from ``results`` alone (harness/results/summary.py), so a tampered copy is caught."""

    branches: BranchSummaries


class RunResults(Block):
    """One run: a defence applied to a model, attacked, evaluated. v2 = v1 plus the derived
    ``judge`` and ``summary`` blocks."""

    model_config = ConfigDict(title=f"harness results.json, schema version {SCHEMA_VERSION}")

    schema_version: Literal[2]
    created: Text
    run_name: Text
    model: ModelRef
    defence: Plugin
    attack: AttackRef
    seed: int
    profile: str
    data: DataRef
    results: Branches
    stages: Stages
    compute: Compute
    libraries: Libraries
    code_version: str | None
    config: RecordedConfig
    judge: JudgeBlock | None = Field(description="null only when no harmfulness evaluation ran")
    summary: Summary


def generated_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :class:`RunResults`, as shipped."""
    return {"$schema": SCHEMA_DIALECT, "$id": f"urn:harmful-ft-harness:schema:results:{SCHEMA_VERSION}",
            **RunResults.model_json_schema()}


def schema_text() -> str:
    return json.dumps(generated_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m harness.results.model [--check]
    if "--check" in sys.argv[1:]:
        stale = not SCHEMA_FILE.is_file() or SCHEMA_FILE.read_text() != schema_text()
        print(f"{SCHEMA_FILE}: {'stale; run python -m harness.results.model' if stale else 'up to date'}")
        sys.exit(1 if stale else 0)
    SCHEMA_FILE.write_text(schema_text())
    print(f"wrote {SCHEMA_FILE}")
