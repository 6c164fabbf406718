"""One typed config describes a run completely. Sources, later winning:
profile (CPU-sized or paper-sized defaults) < YAML file < CLI flags < ``--set path=value``.

Every value, including each plugin's params, is validated before any work starts; errors name
the field (``attack.params.lr: Input should be greater than 0``).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import ConfigError
from harness.files.paths import default_cache_dir
from harness.registry import Params, format_validation_error
from harness.run.names import check_run_name

PROFILES = ("cpu", "paper")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginSpec(_Strict):
    """A plugin by name with its params (validated against the plugin's own params model)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    preset: str | None = Field(None, description="named settings (harness/presets), also written name@preset")

    @model_validator(mode="before")
    @classmethod
    def _name_alone_is_a_spec(cls, value: Any) -> Any:
        """A plugin named where a spec is expected (``judges=[refusal-keywords]``) means it with default params."""
        return {"name": value} if isinstance(value, str) else value

    @property
    def label(self) -> str:
        """``name@preset`` when a preset was used, else the name."""
        return f"{self.name}@{self.preset}" if self.preset else self.name


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
SEED_LIMIT = 2**32  # numpy's seeds are 32-bit; torch and random accept these too



NO_DEFENCE = PluginSpec(name="none")  # the undefended reference branch

class ModelConfig(_Strict):
    ref: str = Field("smollm2-135m-instruct", description="embedded name, tiny-llama, local dir or hub id")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = Field(False, description="never on unless you trust the model's code")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """torch only reports an unknown device type when the first model loads; say it now."""
        if not _DEVICE.match(value):
            raise ValueError("use auto, cpu, cuda, cuda:N or mps")
        return value


class DataConfig(_Strict):
    dir: Path | None = Field(None, description="data directory (default: $HARNESS_DATA_DIR or ../shared/data)")
    eval_prompts: str = Field("advbench", description="evaluation prompt set; training sets exclude its prompts")
    prompt_format: Literal["chat", "question-answer"] = Field(
        "chat", description="model chat template, or the paper's 'Question: …\\nAnswer:' form"
    )


class ResourceConfig(_Strict):
    """What the run may use of the machine (harness/resources): checked before the first stage."""

    device_memory_gb: float | None = Field(
        None, gt=0, description="memory per device to plan for, GiB (default: what the device has free now)")
    memory_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="a training stage whose memory estimate does not fit: refuse before work, warn, or skip")
    keep_attacked_weights: bool = Field(
        False, description="keep attacked models' weights after their evaluations (default: drop them; results, "
                           "generations and the stage key stay, and a stage that needs the weights recreates them)")


class RunConfig(_Strict):
    profile: Literal["cpu", "paper"] = "cpu"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    defence: PluginSpec = Field(default_factory=lambda: PluginSpec(name="none"))
    attack: PluginSpec = Field(default_factory=lambda: PluginSpec(name="full-ft"))
    evaluate: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"harmfulness": {}}, description="evaluator name -> its params"
    )
    compare_undefended: bool = Field(
        True, description="also attack the undefended model, so the defence has a reference under the same attack"
    )
    seed: int = Field(42, ge=0, lt=SEED_LIMIT, description="0 <= seed < 2**32 (numpy's range)")
    run_name: str | None = Field(None, description="run directory name under output_dir (default: derived)")
    resources: ResourceConfig = Field(default_factory=ResourceConfig)

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, value: str | None) -> str | None:
        """A run name is a directory under output_dir and an archive member: never '..', '/' or non-ASCII.
        ConfigError (not ValueError) passes through pydantic with its own one-paragraph message."""
        return None if value is None else check_run_name(value)

    @field_validator("evaluate", mode="before")
    @classmethod
    def _empty_means_defaults(cls, value: Any) -> Any:
        """``evaluate: {capability: }`` in YAML means the evaluator with default params."""
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value
    output_dir: Path = Path("runs")
    cache_dir: Path = Field(default_factory=default_cache_dir)  # $HARNESS_CACHE_DIR or .harness-cache


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_set(expr: str) -> dict[str, Any]:
    """``attack.lr=1e-4`` → {"attack": {"params": {"lr": 1e-4}}} (values parsed as YAML)."""
    if "=" not in expr:
        raise ConfigError(f"--set {expr!r}: expected path.to.field=value, e.g. --set attack.lr=6e-5")
    path, raw = expr.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {expr!r}: empty field path")
    if keys[0] in ("defence", "attack") and len(keys) > 1 and keys[1] not in ("name", "params", "preset"):
        keys.insert(1, "params")  # shortcut: defence.beta means defence.params.beta
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {expr!r}: cannot parse the value ({exc})") from None
    if isinstance(value, str):  # YAML 1.1 reads 6e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    nested: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"Config file {path} is a directory; give the path of a YAML file inside it.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML.") from None
    except OSError as exc:
        raise ConfigError(f"Config file {path} cannot be read ({exc.strerror}); check the path and its "
                          "permissions.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    return data


def build_config(
    config_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    profile: str | None = None,
    evaluate: list[str] | None = None,
) -> RunConfig:
    """Merge profile < file < flags < --set, then validate everything (plugins included).
    ``evaluate`` (``--evaluate``) selects exactly those evaluators, keeping their params from the file."""
    user = load_yaml(config_file) if config_file else {}
    defaults = {"defence": {"name": "none"}, "attack": {"name": "full-ft"}}
    merged = deep_merge(deep_merge(defaults, user), flags or {})
    if evaluate is not None:
        merged["evaluate"] = select_evaluators(merged.get("evaluate"), evaluate)
    for expr in sets or []:
        merged = deep_merge(merged, parse_set(expr))
    chosen = profile or merged.get("profile") or "cpu"
    merged["profile"] = chosen
    try:
        config = RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "config")) from None
    config = apply_presets(config)
    config = apply_profile(config, chosen)
    parsed = validate_plugins(config)
    for where, params in parsed.items():
        check_finite(params.model_dump(), where if where.startswith("evaluate.") else f"{where}.params")
    # Store the validated, typed values: what is recorded is exactly what runs.
    config.defence.params = parsed["defence"].model_dump(mode="json")
    config.attack.params = parsed["attack"].model_dump(mode="json")
    for name in config.evaluate:
        config.evaluate[name] = parsed[f"evaluate.{name}"].model_dump(mode="json")
    return config


def select_evaluators(configured: Any, names: list[str]) -> dict[str, Any]:
    """``--evaluate a,b``: exactly a and b, with whatever params the config file gave them."""
    chosen = [n.strip() for n in names if n.strip()]
    if not chosen:
        raise ConfigError("--evaluate names no evaluator; give a comma-separated list such as "
                          "--evaluate harmfulness,capability (`harness list evaluators` shows them).")
    configured = configured if isinstance(configured, dict) else {}
    return {name: configured.get(name) or {} for name in chosen}


def check_finite(value: Any, where: str) -> None:
    """Pydantic accepts inf and nan for ``gt=0`` floats, and JSON (sweep cells, results) turns them into
    null, which later reads as "got None"; refuse them here, naming the field."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number; give a finite value (e.g. 3e-5).")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        check_finite(item, f"{where}.{key}")


def apply_presets(config: RunConfig) -> RunConfig:
    """Resolve ``name@preset`` (or ``preset:``) of the defence and attack into params under the user's own."""
    from harness.run.presets import preset_params, split_reference

    updated = config.model_copy(deep=True)
    for field, kind in (("defence", "defences"), ("attack", "attacks")):
        spec: PluginSpec = getattr(updated, field)
        name, preset = split_reference(spec.name)
        if preset and spec.preset and preset != spec.preset:
            raise ConfigError(f"{field}: {spec.name!r} names preset {preset!r} but {field}.preset is {spec.preset!r}.")
        spec.name, spec.preset = name, preset or spec.preset
        if spec.preset:
            spec.params = deep_merge(preset_params(kind, name, spec.preset), spec.params)
    return updated


def apply_profile(config: RunConfig, profile: str) -> RunConfig:
    """Put each selected plugin's own sizes for ``profile`` underneath what the user set."""
    from harness.run.presets import profile_params

    updated = config.model_copy(deep=True)
    for field, kind in (("defence", "defences"), ("attack", "attacks")):
        spec: PluginSpec = getattr(updated, field)
        spec.params = deep_merge(profile_params(kind, spec.name, profile) or {}, spec.params)
    for name, values in list(updated.evaluate.items()):
        updated.evaluate[name] = deep_merge(profile_params("evaluators", name, profile) or {}, values or {})
    return updated


def validate_plugins(config: RunConfig) -> dict[str, Params]:
    """Resolve every plugin name and validate its params; returns them keyed by config path."""
    from harness.registry import attacks, defences, evaluators, judges

    parsed = {
        "defence": defences.get(config.defence.name).parse_params(config.defence.params, "defence.params"),
        "attack": attacks.get(config.attack.name).parse_params(config.attack.params, "attack.params"),
    }
    if not config.evaluate:
        raise ConfigError("evaluate: name at least one evaluator (e.g. harmfulness).")
    for name, values in config.evaluate.items():
        params = evaluators.get(name).parse_params(values, f"evaluate.{name}")
        parsed[f"evaluate.{name}"] = params
        for index, spec in enumerate(getattr(params, "judges", None) or []):
            judges.get(spec.name).parse_params(spec.params, f"evaluate.{name}.judges.{index}.params")
    return parsed
