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
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import ConfigError, HarnessError, UnknownPluginError

log = logging.getLogger(__name__)

BUILTIN_MODULES = ("defences", "attacks", "evaluators")


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
    # Extra, kind-specific facts (e.g. a dataset's record type), shown by `harness list`.
    info: dict[str, Any] = field(default_factory=dict)

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
        """Decorator: ``@defences.register("repnoise", params=RepNoiseParams)``."""

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
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                ep.load()  # importing the target runs its @register decorators
            except Exception as exc:  # a broken outside plugin must not break the others
                log.warning("Could not load %s plugin %r from %s: %s", self.kind, ep.name, ep.value, exc)

    def reload_entry_points(self) -> None:
        """Read entry points again (after installing a package in-process, e.g. in tests)."""
        self._entry_points_loaded = False
        self._load_entry_points()

    def get(self, name: str) -> Plugin:
        load_builtins()
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
        load_builtins()
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

_builtins_loaded = False


def load_builtins() -> None:
    """Import the in-repo plugin packages so their decorators run."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    importlib.import_module("harness.datasets")
    importlib.import_module("harness.generation")
    importlib.import_module("harness.vllm_backend")
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


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
