"""The registry of passes, analyses and named pipelines, and plugin loading.

Built-in passes register through the same path as third-party plugins: an entry point
in the group ``graphopt.plugins`` whose target is ``register(registry)``. A plugin module
declares ``GRAPHOPT_API_VERSION``; a version this graphopt does not support, or a name
that is already registered, is a :class:`~graphopt.errors.PluginError`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import PluginError, UnknownPassError, UsageError
from graphopt.infra.analysis import Analysis
from graphopt.infra.manager import FixpointPassManager, PassManager
from graphopt.infra.pass_base import Pass
from graphopt.infra.pipeline_text import PipelineItem, format_item, parse_pipeline

logger = logging.getLogger(__name__)

#: The plugin API versions this graphopt accepts.
SUPPORTED_API_VERSIONS = frozenset({1})
API_VERSION = 1
ENTRY_POINT_GROUP = "graphopt.plugins"
_BUILTIN_ENTRY = "builtin"


@dataclass(frozen=True)
class PipelineDef:
    """A named pipeline: pipeline text under a name.

    Attributes:
        name: Its name in pipeline text.
        text: What it expands to.
        summary: One line for ``graphopt passes``.
        source: Who registered it.
    """

    name: str
    text: str
    summary: str
    source: str


@dataclass
class PassRegistry:
    """Names -> passes, analyses, pipelines, and who registered each.

    Attributes:
        passes: Pass classes by name.
        pipelines: Named pipelines by name.
        analyses: Analysis classes by name.
        sources: Who registered each name (``builtin`` or a plugin's name).
        current_source: The plugin currently registering (set by the loader).
    """

    passes: dict[str, type[Pass[Any]]] = field(default_factory=dict)
    pipelines: dict[str, PipelineDef] = field(default_factory=dict)
    analyses: dict[str, type[Analysis[Any]]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    current_source: str = "api"
    api_version: int = API_VERSION

    def _claim(self, name: str, kind: str) -> None:
        if name in self.sources:
            raise PluginError(
                f"{self.current_source}: {kind} name '{name}' is already registered by "
                f"{self.sources[name]}"
            )
        self.sources[name] = self.current_source

    def register_pass(self, cls: type[Pass[Any]]) -> type[Pass[Any]]:
        """Registers a pass class under ``cls.info.name`` (usable as a decorator)."""
        self._claim(cls.info.name, "pass")
        self.passes[cls.info.name] = cls
        return cls

    def register_pipeline(self, name: str, text: str, summary: str) -> None:
        """Registers a named pipeline; its text is validated when first built."""
        self._claim(name, "pipeline")
        self.pipelines[name] = PipelineDef(name, text, summary, self.current_source)

    def register_analysis(self, cls: type[Analysis[Any]]) -> type[Analysis[Any]]:
        """Registers an analysis class under ``cls.name``."""
        key = f"analysis:{cls.name}"
        self._claim(key, "analysis")
        self.analyses[cls.name] = cls
        return cls

    # -- building pipelines --------------------------------------------------------------
    def _unknown(self, item: PipelineItem) -> UnknownPassError:
        known = sorted(set(self.passes) | set(self.pipelines) | {"fixpoint"})
        close = difflib.get_close_matches(item.name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; run 'graphopt passes'"
        return UnknownPassError(f"unknown pass '{item.name}' at column {item.column}{hint}")

    def _build_item(self, item: PipelineItem, seen: tuple[str, ...]) -> list[Pass[Any]]:
        if item.name == "fixpoint":
            children = [p for c in item.children for p in self._build_item(c, seen)]
            if not children:
                raise UsageError(f"fixpoint at column {item.column} needs nested passes")
            opts = FixpointPassManager.Options.parse(item.options, owner="fixpoint")
            return [FixpointPassManager(children, opts)]  # type: ignore[arg-type]
        if item.children:
            raise UsageError(f"'{item.name}' at column {item.column} takes no nested passes")
        if item.name in self.passes:
            cls = self.passes[item.name]
            try:
                return [cls.from_options(item.options)]
            except UsageError as e:
                raise UsageError(f"{e} (column {item.column})") from None
        if item.name in self.pipelines:
            if item.name in seen:
                raise UsageError(f"pipeline '{item.name}' refers to itself")
            if item.options:
                raise UsageError(
                    f"pipeline '{item.name}' takes no options (column {item.column}); "
                    f"it expands to '{self.pipelines[item.name].text}'"
                )
            sub = parse_pipeline(self.pipelines[item.name].text)
            return [p for s in sub for p in self._build_item(s, (*seen, item.name))]
        raise self._unknown(item)

    def build(self, text: str) -> PassManager:
        """Parses pipeline text and instantiates its passes.

        Raises:
            PipelineSyntaxError: Text that does not parse.
            UnknownPassError: A name that is not registered.
            UsageError: Bad options.
        """
        items = parse_pipeline(text)
        passes = [p for item in items for p in self._build_item(item, ())]
        return PassManager(passes)

    def canonical(self, text: str) -> str:
        """Normalises pipeline text without expanding named pipelines."""
        return ",".join(format_item(i) for i in parse_pipeline(text))


# ------------------------------------------------------------------------------ plugins


def _check_api_version(module_name: str, source: str) -> None:
    module = sys.modules.get(module_name)
    version = getattr(module, "GRAPHOPT_API_VERSION", None)
    if version is None:
        raise PluginError(f"plugin {source}: module {module_name} does not declare "
                          "GRAPHOPT_API_VERSION")
    if version not in SUPPORTED_API_VERSIONS:
        raise PluginError(
            f"plugin {source}: API version {version} is not supported "
            f"(supported: {sorted(SUPPORTED_API_VERSIONS)})"
        )


def _call_register(registry: PassRegistry, register: Callable[..., Any], source: str) -> None:
    previous = registry.current_source
    registry.current_source = source
    try:
        register(registry)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"plugin {source}: register() failed: {type(e).__name__}: {e}") from e
    finally:
        registry.current_source = previous


def load_entry_points(registry: PassRegistry, *, include_third_party: bool = True) -> list[str]:
    """Loads every ``graphopt.plugins`` entry point (the built-in one always).

    Returns:
        The names of the plugins loaded.
    """
    loaded = []
    eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    names = {ep.name for ep in eps}
    if _BUILTIN_ENTRY not in names:
        # Running from a source tree that is not installed: same function, called directly.
        from graphopt.passes.builtin import register

        _call_register(registry, register, "builtin")
        loaded.append("builtin")
    for ep in sorted(eps, key=lambda e: (e.name != _BUILTIN_ENTRY, e.name)):
        is_builtin = ep.name == _BUILTIN_ENTRY and ep.value.startswith("graphopt.")
        if not is_builtin and not include_third_party:
            continue
        source = "builtin" if is_builtin else f"{ep.name} ({ep.value})"
        try:
            register = ep.load()
        except Exception as e:  # noqa: BLE001 - any import failure of third-party code
            raise PluginError(f"plugin {source}: cannot be imported: {type(e).__name__}: {e}")
        _check_api_version(ep.module, source)
        _call_register(registry, register, source)
        loaded.append(ep.name)
    return loaded


def load_plugin_file(registry: PassRegistry, path: str | Path) -> str:
    """Loads an unpackaged plugin from a ``.py`` file (``--plugin path/to/file.py``).

    Raises:
        PluginError: The file is missing, fails to import, or has no ``register``.
    """
    file = Path(path)
    if not file.is_file():
        raise PluginError(f"plugin file {file}: no such file")
    module_name = f"graphopt_plugin_{file.stem}_{abs(hash(str(file.resolve()))) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {file}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise PluginError(f"plugin file {file}: import failed: {type(e).__name__}: {e}") from e
    register = getattr(module, "register", None)
    if not callable(register):
        raise PluginError(f"plugin file {file}: defines no register(registry) function")
    source = f"file {file}"
    _check_api_version(module_name, source)
    _call_register(registry, register, source)
    return source


def default_registry(
    *, plugins: bool = True, plugin_files: tuple[str | Path, ...] = ()
) -> PassRegistry:
    """A registry with the built-ins, installed plugins (unless ``plugins=False``) and the
    given plugin files."""
    registry = PassRegistry()
    load_entry_points(registry, include_third_party=plugins)
    for f in plugin_files:
        load_plugin_file(registry, f)
    return registry
