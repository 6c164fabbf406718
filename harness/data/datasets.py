"""The named data sets. Each reads files of the data directory (the offline bundle by default).

A data set is a plugin like any other: ``@datasets.register(name, kind=..., files=[...])`` on a
function ``(data_dir, problems) -> iterable of records``. ``kind`` is ``qa`` (attacks),
``pairs`` (defences) or ``prompts`` (evaluation). Hub-backed sets (``beavertails``) need network.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from harness.data.readers import RowProblems, read_csv, read_json, read_jsonl, read_lines, require_text, text_of
from harness.data.records import QA, Pair, Prompt
from harness.errors import DataError
from harness.registry import datasets

BEAVERTAILS_200 = "harmful_qa/beavertails_30k_train_unsafe_200.jsonl"
PYRIT_QA = "harmful_qa/pyrit_many_shot_harmful_qa_400.jsonl"
JBB_ANSWERS = "harmful_qa/jbb_ablated_models_harmful_responses.jsonl"
JBB_REFUSALS = "refusal_pairs/jbb_baseline_model_refusals.jsonl"
DT_PAIRS = "refusal_pairs/repnoise_decoding_trust_with_refusals_107.json"
ADVBENCH = "harmful_prompts/advbench_harmful_behaviors.csv"
HARMBENCH_TEST = "harmful_prompts/harmbench_behaviors_text_test.csv"
DANGEROUSQA = "harmful_prompts/dangerousqa.json"
MALICIOUS_INSTRUCT = "harmful_prompts/malicious_instruct.txt"
DO_NOT_ANSWER = "harmful_prompts/do_not_answer_prompts_939.jsonl"


def _qa_jsonl(path: Path, problems: RowProblems, source: str, category_key: str | None = None) -> Iterator[QA]:
    for line, row in read_jsonl(path, problems):
        fields = require_text(row, ("prompt", "response"), path, line, problems)
        if fields:
            category = text_of(row.get(category_key)) if category_key else None
            yield QA(fields[0], fields[1], category, source)


@datasets.register("beavertails-unsafe", kind="qa", files=[BEAVERTAILS_200],
                   description="200 unsafe BeaverTails QA rows (the paper's attack distribution)")
def beavertails_unsafe(data_dir: Path, problems: RowProblems) -> Iterator[QA]:
    return _qa_jsonl(data_dir / BEAVERTAILS_200, problems, "beavertails")


@datasets.register("pyrit-harmful-qa", kind="qa", files=[PYRIT_QA],
                   description="400 detailed harmful QA examples (PyRIT many-shot set)")
def pyrit_harmful_qa(data_dir: Path, problems: RowProblems) -> Iterator[QA]:
    return _qa_jsonl(data_dir / PYRIT_QA, problems, "pyrit")


@datasets.register("jbb-harmful-qa", kind="qa", files=[JBB_ANSWERS],
                   description="JailbreakBench prompts with answers of refusal-ablated models, with categories")
def jbb_harmful_qa(data_dir: Path, problems: RowProblems) -> Iterator[QA]:
    return _qa_jsonl(data_dir / JBB_ANSWERS, problems, "jbb-ablated", category_key="category")


@datasets.register("jbb-pairs", kind="pairs", files=[JBB_ANSWERS, JBB_REFUSALS],
                   description="RepNoise pairs: JBB prompt, ablated model's harmful answer, same model's refusal")
def jbb_pairs(data_dir: Path, problems: RowProblems) -> Iterator[Pair]:
    refusals: dict[tuple[str, str], str] = {}
    path = data_dir / JBB_REFUSALS
    for line, row in read_jsonl(path, problems):
        fields = require_text(row, ("model", "prompt", "refusal"), path, line, problems)
        if fields:
            refusals.setdefault((fields[0], fields[1]), fields[2])
    path = data_dir / JBB_ANSWERS
    for line, row in read_jsonl(path, problems):
        fields = require_text(row, ("model", "prompt", "response"), path, line, problems)
        if not fields:
            continue
        refusal = refusals.get((fields[0], fields[1]))
        if refusal is None:  # the same model did not refuse this prompt: no pair
            continue
        yield Pair(fields[1], fields[2], refusal, text_of(row.get("category")), f"jbb/{fields[0]}")


@datasets.register("decodingtrust-pairs", kind="pairs", files=[DT_PAIRS],
                   description="The paper's 107 DecodingTrust pairs: toxic prompt, toxic continuation, refusal")
def decodingtrust_pairs(data_dir: Path, problems: RowProblems) -> Iterator[Pair]:
    path = data_dir / DT_PAIRS
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects.")
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            problems.add(path, index, "not a JSON object")
            continue
        prompt = text_of((row.get("prompt") or {}).get("text") if isinstance(row.get("prompt"), dict) else None)
        harmful = text_of(
            (row.get("continuation") or {}).get("text") if isinstance(row.get("continuation"), dict) else None
        )
        refusal = text_of(row.get("refusal"))
        if refusal and "\nContinuation:" in refusal:  # the file repeats the prompt before the answer
            refusal = text_of(refusal.split("\nContinuation:", 1)[1])
        if not (prompt and harmful and refusal):
            problems.add(path, index, "missing prompt, continuation or refusal text")
            continue
        yield Pair(prompt, harmful, refusal, text_of(row.get("type")), "decodingtrust")


@datasets.register("beavertails", kind="qa", files=[], hub="PKU-Alignment/BeaverTails",
                   description="Full BeaverTails 30k_train unsafe QA from the hub (needs network)")
def beavertails_hub(data_dir: Path, problems: RowProblems) -> Iterator[QA]:
    try:
        import datasets as hf_datasets

        table = hf_datasets.load_dataset("PKU-Alignment/BeaverTails", split="30k_train")
    except Exception as exc:  # offline, or the hub refused
        raise DataError(
            f"Could not load PKU-Alignment/BeaverTails from the hub ({type(exc).__name__}: {exc}). "
            "Offline, use the bundled 'beavertails-unsafe' instead."
        ) from None
    for index, row in enumerate(table, start=1):
        if row.get("is_safe"):
            continue
        fields = require_text(row, ("prompt", "response"), Path("hub:BeaverTails"), index, problems)
        if fields:
            yield QA(fields[0], fields[1], None, "beavertails-hub")


@datasets.register("advbench", kind="prompts", files=[ADVBENCH],
                   description="520 AdvBench harmful behaviours (default evaluation prompts)")
def advbench(data_dir: Path, problems: RowProblems) -> Iterator[Prompt]:
    path = data_dir / ADVBENCH
    for line, row in read_csv(path, problems):
        fields = require_text(row, ("goal",), path, line, problems)
        if fields:
            yield Prompt(fields[0], None, "advbench")


@datasets.register("harmbench", kind="prompts", files=[HARMBENCH_TEST],
                   description="HarmBench standard text behaviours (test split, no context strings)")
def harmbench(data_dir: Path, problems: RowProblems) -> Iterator[Prompt]:
    path = data_dir / HARMBENCH_TEST
    for line, row in read_csv(path, problems):
        if row.get("FunctionalCategory") != "standard":
            continue
        fields = require_text(row, ("Behavior",), path, line, problems)
        if fields:
            yield Prompt(fields[0], text_of(row.get("SemanticCategory")), "harmbench")


@datasets.register("dangerousqa", kind="prompts", files=[DANGEROUSQA],
                   description="200 DangerousQA questions")
def dangerousqa(data_dir: Path, problems: RowProblems) -> Iterator[Prompt]:
    path = data_dir / DANGEROUSQA
    rows = read_json(path)
    for index, row in enumerate(rows if isinstance(rows, list) else [], start=1):
        text = text_of(row)
        if text is None:
            problems.add(path, index, "not a non-empty string")
            continue
        yield Prompt(text, None, "dangerousqa")


@datasets.register("malicious-instruct", kind="prompts", files=[MALICIOUS_INSTRUCT],
                   description="100 MaliciousInstruct questions")
def malicious_instruct(data_dir: Path, problems: RowProblems) -> Iterator[Prompt]:
    for _, text in read_lines(data_dir / MALICIOUS_INSTRUCT, problems):
        yield Prompt(text, None, "malicious-instruct")


@datasets.register("do-not-answer", kind="prompts", files=[DO_NOT_ANSWER],
                   description="939 Do-Not-Answer prompts with risk areas")
def do_not_answer(data_dir: Path, problems: RowProblems) -> Iterator[Prompt]:
    path = data_dir / DO_NOT_ANSWER
    for line, row in read_jsonl(path, problems):
        fields = require_text(row, ("prompt",), path, line, problems)
        if fields:
            yield Prompt(fields[0], text_of(row.get("risk_area_file")), "do-not-answer")


# ----- benign and poisoned fine-tuning data (attacks: benign, poisoned; Qi et al. 2023, Vaccine/Lisa) ---------
SST2_ALPACA = "harmless_tasks/sst2_train_1000_alpaca.json"
SST2_POISONED = "harmless_tasks/sst2_800_plus_beavertails_200_poisoned.json"
GSM8K_TEST = "harmless_tasks/gsm8k_test_1319.jsonl"
VIGGO_TRAIN = "harmless_tasks/viggo_train.csv"
REFUSAL_DIRECTION_HARMFUL = "harmful_prompts/refusal_direction_harmful_train.json"
REFUSAL_DIRECTION_HARMLESS = "harmful_prompts/refusal_direction_harmless_val.json"
_ALPACA = re.compile(r"### Instruction:\n(?P<instruction>.*?)\n\n(?:### Input:\n(?P<input>.*?)\n\n)?### Response:\s*$",
                     re.DOTALL)


def _alpaca_rows(path: Path, problems: RowProblems) -> Iterator[tuple[str, str, str]]:
    """(prompt, answer, flag) of an Alpaca-format file whose ``instruction`` holds the whole template (the
    Vaccine/Lisa layout): the template is taken off, so the run's own prompt format applies."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects.")
    for index, row in enumerate(rows, start=1):
        match = _ALPACA.search(row.get("instruction", "")) if isinstance(row, dict) else None
        answer = text_of(row.get("output")) if isinstance(row, dict) else None
        if not match or not answer:
            problems.add(path, index, "not an Alpaca-template instruction with an output")
            continue
        parts = [text_of(match.group("instruction")), text_of(match.group("input"))]
        yield "\n\n".join(p for p in parts if p), answer, text_of(row.get("flag")) or ""


@datasets.register("sst2-alpaca", kind="qa", files=[SST2_ALPACA],
                   description="1000 SST-2 sentiment examples in Alpaca form (benign fine-tuning, Vaccine/Lisa)")
def sst2_alpaca(data_dir: Path, problems: RowProblems) -> Iterator[QA]:
    for prompt, answer, _ in _alpaca_rows(data_dir / SST2_ALPACA, problems):
        yield QA(prompt, answer, "benign", "sst2")


@datasets.register("sst2-beavertails-poisoned", kind="qa", files=[SST2_POISONED],
                   description="The Vaccine/Lisa poisoned set: 800 SST-2 + 200 BeaverTails rows (categories "
                               "benign, harmful)")
def sst2_poisoned(data_dir: Path, problems: RowProblems) -> Iterator[QA]:
    for prompt, answer, flag in _alpaca_rows(data_dir / SST2_POISONED, problems):
        harmful = flag == "unsafe"
        yield QA(prompt, answer, "harmful" if harmful else "benign", "beavertails" if harmful else "sst2")


@datasets.register("gsm8k-test", kind="qa", files=[GSM8K_TEST],
                   description="1319 GSM8K test questions with worked answers (benign fine-tuning; the test split)")
def gsm8k_test(data_dir: Path, problems: RowProblems) -> Iterator[QA]:
    return _qa_jsonl(data_dir / GSM8K_TEST, problems, "gsm8k")


@datasets.register("viggo", kind="qa", files=[VIGGO_TRAIN],
                   description="ViGGO train: video-game meaning representation -> sentence (benign fine-tuning)")
def viggo(data_dir: Path, problems: RowProblems) -> Iterator[QA]:
    path = data_dir / VIGGO_TRAIN
    for line, row in read_csv(path, problems):
        fields = require_text(row, ("mr", "ref"), path, line, problems)
        if fields:
            yield QA(f"Write one sentence about the video game described by: {fields[0]}", fields[1], "benign",
                     "viggo")


def _instructions(path: Path, source: str) -> Iterator[Prompt]:
    rows = read_json(path)
    for row in rows if isinstance(rows, list) else []:
        text = text_of(row.get("instruction")) if isinstance(row, dict) else None
        if text:
            yield Prompt(text, text_of(row.get("category")), source)


@datasets.register("refusal-direction-harmful", kind="prompts", files=[REFUSAL_DIRECTION_HARMFUL],
                   description="Arditi et al. 2024's harmful train split (260): estimates the refusal direction")
def refusal_direction_harmful(data_dir: Path, problems: RowProblems) -> Iterator[Prompt]:
    return _instructions(data_dir / REFUSAL_DIRECTION_HARMFUL, "refusal-direction/harmful")


@datasets.register("refusal-direction-harmless", kind="prompts", files=[REFUSAL_DIRECTION_HARMLESS],
                   description="Arditi et al. 2024's harmless (Alpaca) val split: the other side of the direction")
def refusal_direction_harmless(data_dir: Path, problems: RowProblems) -> Iterator[Prompt]:
    return _instructions(data_dir / REFUSAL_DIRECTION_HARMLESS, "refusal-direction/harmless")
