"""Everything a plugin author needs, in one import: ``from harness.api import ...``.

A defence, attack, evaluator, judge, data set or generation backend is a plain function registered
on one of the registries below, with a typed :class:`Params` model. It receives a
:class:`StageContext` (seed, device, data access, scratch space, progress) and returns what its
kind returns: a defence or an attack a :class:`Trained`, an evaluator an :class:`EvalResult`, a
judge an object with ``score(prompts, responses)`` and ``describe()`` (see :class:`Judge`). The
names here are the stable surface; modules behind them may move.
"""

from harness.context import StageContext
from harness.data.readers import RowProblems, read_csv, read_json, read_jsonl, text_of
from harness.data.records import QA, Pair, Prompt, normalise_prompt
from harness.data.tokenization import IGNORE_INDEX, collate_pairs, collate_sft, encode_pair, encode_sft, format_prompt
from harness.data.triggers import Trigger, check_representable, check_trigger_text
from harness.distributed import global_batch
from harness.errors import ConfigError, DataError, HarnessError
from harness.evaluation import EvalResult
from harness.files.atomic import atomic_dir, write_json
from harness.files.hashing import cached_file_sha256, file_sha256, stable_hash
from harness.files.paths import resolve_data_dir
from harness.judging import Judge, score_answered, template_fields
from harness.models.activations import (
    attention_modules,
    attention_output_grads,
    capture_activations,
    decoder_parts,
    forward_hooks,
    main_output,
    unwrap,
)
from harness.models.generation import GenerationSettings, HFBackend, resolve_backend
from harness.models.loading import (
    EMBEDDED_MODEL,
    LoadedModel,
    load_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)
from harness.outcome import Trained
from harness.registry import (
    NoParams,
    Params,
    attacks,
    backends,
    datasets,
    defences,
    evaluators,
    import_package_modules,
    judges,
)
from harness.results.stats import corrected_rate, mean_ci, wilson_ci
from harness.run.config import PluginSpec, RunConfig, build_config
from harness.terminal import plain
from harness.train.loop import TrainingRun, TrainReport, TrainSettings, intercept_training, train
from harness.train.losses import Targets, head_ce_sums, mmd, pair_ces, position_mask, shift_targets
from harness.train.sft import (
    PairDefenceSettings,
    PairSettings,
    PairSFTSettings,
    SFTParams,
    SFTSettings,
    causal_lm_loss,
    cpu_pair_sizes,
    fine_tune,
    pair_side,
)

__all__ = [
    "atomic_dir", "attacks", "attention_modules", "attention_output_grads", "backends", "build_config",
    "cached_file_sha256",
    "capture_activations", "causal_lm_loss", "check_representable", "check_trigger_text", "collate_pairs",
    "collate_sft", "ConfigError", "corrected_rate", "cpu_pair_sizes", "DataError", "datasets", "decoder_parts",
    "defences", "EMBEDDED_MODEL", "encode_pair", "encode_sft", "EvalResult", "evaluators", "file_sha256", "fine_tune",
    "format_prompt", "forward_hooks", "GenerationSettings", "global_batch", "HarnessError", "head_ce_sums", "HFBackend",
    "IGNORE_INDEX", "import_package_modules", "intercept_training", "Judge", "judges", "load_model", "LoadedModel",
    "main_output", "mean_ci", "mmd", "model_fingerprint", "NoParams", "normalise_prompt", "Pair", "pair_ces",
    "pair_side", "PairDefenceSettings", "PairSettings", "PairSFTSettings", "Params", "plain", "PluginSpec",
    "position_mask", "Prompt", "QA", "read_csv", "read_json", "read_jsonl", "resolve_backend", "resolve_data_dir",
    "resolve_device", "resolve_dtype", "RowProblems", "RunConfig", "score_answered", "SFTParams", "SFTSettings",
    "shift_targets", "stable_hash", "StageContext", "Targets", "template_fields", "text_of", "train", "Trained",
    "TrainingRun", "TrainReport", "TrainSettings", "Trigger", "unwrap", "wilson_ci", "write_json",
]
