"""Named plugin registries: defences, attacks, evaluators, judges, datasets, generation backends.

Plugins inside this repository register with a decorator; outside packages register through
package entry points (group ``harness.<kind>``, e.g. ``harness.defences``) whose target is a
module that uses the same decorator, so no core file is edited to add a plugin.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import ConfigError, HarnessError, UnknownPluginError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hook:
    """A keyword a plugin may give ``register``: what the harness does with it and what it must be."""

    expects: str
    accepts: Callable[[Any], bool]
    doc: str


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _files(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _named_params(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in value.items())


_DATA_FILES = Hook("a function params -> data-dir-relative paths", callable,
                   "files the plugin reads directly; their sha256 goes into the stage key")
_DEPENDS_ON = Hook("a function params -> JSON value", callable,
                   "what else shapes the output (e.g. a judge's version); goes into the stage key")
_PROFILES = Hook("a dict profile name -> params", _named_params,
                 "the plugin's sizes per profile (cpu, paper), under the user's own settings")
_PRESETS = Hook("a dict preset name -> params", _named_params,
                "named settings, selected as name@preset; above the profile, below the user's settings")

# Every keyword ``register`` takes beyond name/params/description/version, per plugin kind. A typo
# (``during_atack=``) must fail at import, not switch a hook off and change the numbers silently.
HOOKS: dict[str, dict[str, Hook]] = {
    "defences": {
        "during_attack": Hook("a context-manager factory (model, params, artefacts)", callable,
                              "wrapped around the attack; defender-controlled fine-tuning (e.g. security vectors)"),
        "data_files": _DATA_FILES,
        "depends_on": _DEPENDS_ON,
        "profiles": _PROFILES,
        "presets": _PRESETS,
    },
    "attacks": {
        "threat_model": Hook("a non-empty string", _text, "open-weight or fine-tuning-api, recorded in results"),
        "data_files": _DATA_FILES,
        "depends_on": _DEPENDS_ON,
        "profiles": _PROFILES,
        "presets": _PRESETS,
    },
    "evaluators": {
        "headline": Hook("a metric name", _text, "the metric shown in summaries, sweeps and the leaderboard"),
        "data_files": _DATA_FILES,
        "depends_on": _DEPENDS_ON,
        "profiles": _PROFILES,
    },
    "judges": {
        "identity": Hook("a function params -> JSON value", callable,
                         "identifies the scoring model without loading it (part of the harmfulness stage key)"),
        "data_files": _DATA_FILES,
    },
    "datasets": {
        "kind": Hook("'qa', 'pairs' or 'prompts'", lambda v: v in ("qa", "pairs", "prompts"), "record type"),
        "files": Hook("a list of data-dir-relative paths", _files, "files read; checked and fingerprinted"),
        "hub": Hook("a hub data set id", _text, "where a hub-backed data set comes from (needs network)"),
    },
    "backends": {},
}


def check_hooks(kind: str, name: str, info: dict[str, Any]) -> None:
    """Refuse a keyword that is not a hook of ``kind``, or a hook value of the wrong type."""
    allowed = HOOKS.get(kind, {})
    for key, value in info.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise HarnessError(f"{kind} plugin {name!r} registers with unknown keyword {key!r}.{hint} "
                               f"{kind} take: {', '.join(sorted(allowed)) or 'no extra keywords'}.")
        if not allowed[key].accepts(value):
            raise HarnessError(f"{kind} plugin {name!r}: {key}= must be {allowed[key].expects}, got {value!r}.")

DISTRIBUTION = "harmful-ft-harness"  # its built-in plugins are entry points too (pyproject.toml)
BUILTIN_MODULES = ("defences", "attacks", "evaluators", "harness")  # where built-in plugin code lives


class Params(BaseModel):
    """Base class for plugin parameters: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class NoParams(Params):
    """For plugins without parameters."""


@dataclass(frozen=True)
class Plugin:
    """One registered plugin: a plain function plus its typed params model."""

    kind: str
    name: str
    fn: Callable[..., Any]
    params_model: type[Params]
    description: str
    version: str = "1"
    # The kind's hooks this plugin gave (see HOOKS), checked at registration; read with hook().
    info: dict[str, Any] = field(default_factory=dict)

    def hook(self, name: str) -> Any:
        """The plugin's value for hook ``name``, or None; a name that is no hook of this kind is a bug."""
        if name not in HOOKS.get(self.kind, {}):
            raise KeyError(f"{name!r} is not a hook of {self.kind} (known: {', '.join(HOOKS.get(self.kind, {}))})")
        return self.info.get(name)

    def parse_params(self, values: dict[str, Any] | None, where: str) -> Params:
        """Validate ``values`` against the params model; errors name ``where.field``."""
        try:
            return self.params_model.model_validate(values or {})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where)) from None

    def param_table(self) -> list[tuple[str, str, str, str]]:
        """(name, type, default, description) of every param, for `harness list`."""
        rows = []
        for name, f in self.params_model.model_fields.items():
            annotation = getattr(f.annotation, "__name__", None) or str(f.annotation)
            annotation = annotation.replace("typing.", "")
            default = "required" if f.is_required() else _short_default(f.get_default(call_default_factory=True))
            rows.append((name, annotation, default, f.description or ""))
        return rows


def _short_default(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_error(exc: ValidationError, where: str) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        path = f"{where}.{loc}" if loc else where
        if err["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown field")
        else:
            problems.append(f"{path}: {err['msg']} (got {err.get('input')!r})")
    return "Invalid configuration: " + "; ".join(problems)


class Registry:
    """Plugins of one kind, by name. Entry points are read lazily, once."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entry_point_group = f"harness.{kind}"
        self._plugins: dict[str, Plugin] = {}
        self._entry_points_loaded = False

    def register(
        self,
        name: str,
        *,
        params: type[Params] = NoParams,
        description: str | None = None,
        version: str = "1",
        **info: Any,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@defences.register("repnoise", params=RepNoiseParams)``; ``info``: the kind's hooks
        (HOOKS), anything else is an error here, at import."""

        check_hooks(self.kind, name, info)

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            doc = description or (fn.__doc__ or "").strip().split("\n")[0]
            plugin = Plugin(self.kind, name, fn, params, doc, version, dict(info))
            existing = self._plugins.get(name)
            if existing is not None and existing.fn is not fn:
                same_code = (existing.fn.__module__, existing.fn.__qualname__) == (fn.__module__, fn.__qualname__)
                if not same_code:
                    raise HarnessError(
                        f"Two {self.kind} plugins are named {name!r}: {existing.fn.__module__} and "
                        f"{fn.__module__}. Rename one of them."
                    )
            self._plugins[name] = plugin
            return fn

        return decorate

    def _load_entry_points(self) -> None:
        """Import every module registered under this kind's entry-point group, the built-in ones
        included: they are declared in the harness's own pyproject.toml exactly as an outside package
        declares its plugins, so no list of modules lives here."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        builtin = 0
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            dist = getattr(ep, "dist", None)
            if dist is not None and dist.metadata["Name"] == DISTRIBUTION:
                ep.load()  # a broken built-in is a bug: let it show
                builtin += 1
                continue
            try:
                ep.load()  # importing the target runs its @register decorators
            except Exception as exc:  # a broken outside plugin must not break the others
                log.warning("Could not load %s plugin %r from %s: %s", self.kind, ep.name, ep.value, exc)
        if not builtin:
            self._entry_points_loaded = False
            raise HarnessError(f"The harness's built-in {self.kind} are not registered: its package metadata "
                               "(entry points) is missing or stale. Install it with `pip install -e .` "
                               "(`make setup` does) and try again.")

    def reload_entry_points(self) -> None:
        """Read entry points again (after installing a package in-process, e.g. in tests)."""
        self._entry_points_loaded = False
        self._load_entry_points()

    def get(self, name: str) -> Plugin:
        self._load_entry_points()
        try:
            return self._plugins[name]
        except KeyError:
            known = sorted(self._plugins)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownPluginError(
                f"Unknown {self.kind[:-1] if self.kind.endswith('s') else self.kind} {name!r}.{hint} "
                f"Known: {', '.join(known) or '(none)'}. `harness list {self.kind}` shows them with their params."
            ) from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._plugins)

    def plugins(self) -> list[Plugin]:
        return [self._plugins[n] for n in self.names()]


defences = Registry("defences")
attacks = Registry("attacks")
evaluators = Registry("evaluators")
judges = Registry("judges")
datasets = Registry("datasets")
backends = Registry("backends")

REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (defences, attacks, evaluators, judges, datasets, backends)
}

def import_package_modules(package: str, path: Any) -> list[str]:
    """Import every module of a plugin package (``__init__`` passes its ``__name__, __path__``), so a
    recipe registers by being there: a new built-in defence is one new file, no list to extend."""
    names = sorted(info.name for info in pkgutil.iter_modules(path) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


def load_all() -> None:
    """Register every plugin of every kind (built-in and installed outside packages)."""
    for registry in REGISTRIES.values():
        registry._load_entry_points()


def registry_for(kind: str) -> Registry:
    plural = {"defence": "defences", "attack": "attacks", "evaluator": "evaluators", "judge": "judges",
              "dataset": "datasets", "backend": "backends"}.get(kind, kind)
    try:
        return REGISTRIES[plural]
    except KeyError:
        close = difflib.get_close_matches(kind, list(REGISTRIES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPluginError(
            f"Unknown plugin kind {kind!r}.{hint} Known: {', '.join(REGISTRIES)}."
        ) from None
