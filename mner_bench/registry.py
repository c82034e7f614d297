"""Plugin discovery (pluggy + entry points) and the component registry.

``get_registry()`` loads every plugin of the entry-point group ``mner_bench`` once,
validates it against :mod:`mner_bench.hookspecs` and collects what each contributes.
Lookups of unknown names fail with the list of what exists and the closest match; a name
registered twice fails and names both plugins. Nothing is ever overwritten silently.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .errors import MnerBenchError, PluginError, UnknownNameError

KINDS = ("text_encoder", "visual_encoder", "aligner", "decoder", "dataset", "method")

_HOOK_OF_KIND = {
    "text_encoder": "mner_bench_text_encoders",
    "visual_encoder": "mner_bench_visual_encoders",
    "aligner": "mner_bench_aligners",
    "decoder": "mner_bench_decoders",
    "dataset": "mner_bench_datasets",
    "method": "mner_bench_methods",
}


@dataclass(frozen=True)
class ComponentSpec:
    """A buildable component.

    :param name: the name used in configs (``decoder.name=crf``).
    :param config_class: a dataclass with the component's settings (its defaults).
    :param factory: ``factory(cfg, **context)`` builds the component from its config node.
    :param description: one line for ``mner-bench list``.
    :param text_only_inference: aligners only: ``f(cfg) -> bool``, True when the configured
        aligner runs on text alone at inference, so that prediction builds the model without its
        visual encoder (and never imports it). The aligner's factory then gets
        ``visual_encoder=None``, ``inference=True`` and ``state``: the state dict about to be
        loaded (or None), to read sizes that the visual encoder would otherwise give.
    """

    name: str
    config_class: type
    factory: Callable[..., Any]
    description: str = ""
    text_only_inference: Callable[[Any], bool] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: ``loader(split, cfg)`` returns a list of :class:`~mner_bench.data.Tweet`.

    :param splits: the split names it has (``train``, ``dev``, ``test``).
    :param aliases: short names that resolve to this one.
    :param image_loader: for a data set that brings its own images (generated ones, for
        example): ``image_loader(cfg)`` (``cfg`` = the run's ``data`` config) returns a function
        ``IMGID -> PIL.Image.Image | None`` (None: the tweet has no image). Used by
        :mod:`mner_bench.images` unless ``data.image_dir`` names a folder.
    """

    name: str
    loader: Callable[..., Any]
    description: str = ""
    splits: tuple[str, ...] = ("train", "dev", "test")
    aliases: tuple[str, ...] = ()
    has_images: bool = False
    config_class: type | None = None
    image_loader: Callable[[Any], Callable[[str], Any]] | None = None
    #: config defaults of runs on this data set (e.g. ``{"train": {"epochs": 10}}``), merged
    #: after the method's YAML and before ``--config``, overrides and options
    run_defaults: dict | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A named recipe: a default config (YAML path or dict) that names its components."""

    name: str
    defaults: Path | dict
    description: str = ""
    multimodal: bool = False


@dataclass
class Registered:
    spec: Any
    plugin: str


@dataclass
class Registry:
    """Everything the loaded plugins registered, by kind then name."""

    pm: pluggy.PluginManager
    entries: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in KINDS})
    aliases: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def add(self, kind: str, spec: Any, plugin: str) -> None:
        table = self.entries[kind]
        for name in (spec.name, *getattr(spec, "aliases", ())):
            owner = table.get(name) or (
                table.get(self.aliases[kind][name]) if name in self.aliases[kind] else None
            )
            if owner is not None:
                raise PluginError(
                    f"{kind} '{name}' is registered twice: by plugin '{owner.plugin}' and by "
                    f"plugin '{plugin}'. Rename one of them."
                )
        table[spec.name] = Registered(spec, plugin)
        for alias in getattr(spec, "aliases", ()):
            self.aliases[kind][alias] = spec.name

    def resolve_name(self, kind: str, name: str) -> str:
        return self.aliases[kind].get(name, name)

    def get(self, kind: str, name: str) -> Registered:
        if kind not in self.entries:
            raise MnerBenchError(f"unknown component kind '{kind}'; kinds: {', '.join(KINDS)}")
        real = self.resolve_name(kind, name)
        try:
            return self.entries[kind][real]
        except KeyError:
            names = list(self.entries[kind]) + list(self.aliases[kind])
            raise UnknownNameError(kind.replace("_", " "), name, names) from None

    def spec(self, kind: str, name: str) -> Any:
        return self.get(kind, name).spec

    def list_components(self, kind: str, pattern: str = "*") -> list[str]:
        """Names of ``kind`` matching the glob ``pattern``, sorted."""
        return sorted(n for n in self.entries[kind] if fnmatch.fnmatch(n, pattern))

    def create_component(self, kind: str, name: str, cfg: Any, **context: Any) -> Any:
        """Build the component ``name`` of ``kind`` from its config node."""
        spec = self.spec(kind, name)
        return spec.factory(cfg, **context)

    def items(self, kind: str) -> Iterator[tuple[str, Registered]]:
        yield from sorted(self.entries[kind].items())

    @property
    def hook(self):
        return self.pm.hook


def _plugin_entry_points():
    return entry_points(group=hookspecs.PROJECT)


def build_registry(extra_plugins: tuple[tuple[str, object], ...] = ()) -> Registry:
    """Load all plugins of the entry-point group (plus ``extra_plugins``) and collect them."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for ep in sorted(_plugin_entry_points(), key=lambda e: (e.name != "core", e.name)):
        try:
            plugin = ep.load()
        except Exception as exc:  # the plugin's own import failed: name it
            raise PluginError(
                f"plugin '{ep.name}' ({ep.value}) could not be imported: {type(exc).__name__}: {exc}"
            ) from exc
        _register(pm, plugin, ep.name)
    for name, plugin in extra_plugins:
        _register(pm, plugin, name)
    registry = Registry(pm)
    for kind, hook_name in _HOOK_OF_KIND.items():
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            specs = impl.function()
            if specs is None:
                continue
            for spec in specs:
                _check_spec(kind, spec, impl.plugin_name)
                registry.add(kind, spec, impl.plugin_name)
    return registry


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name}' does not match the hook specifications: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(plugin)
        raise PluginError(
            f"plugin '{name}' implements a hook that mner-bench does not define: {exc}. "
            f"Known hooks are listed in mner_bench/hookspecs.py."
        ) from exc


def _check_spec(kind: str, spec: Any, plugin: str) -> None:
    expected = {"method": MethodSpec, "dataset": DatasetSpec}.get(kind, ComponentSpec)
    if not isinstance(spec, expected):
        raise PluginError(
            f"plugin '{plugin}' returned {type(spec).__name__} from {_HOOK_OF_KIND[kind]}; "
            f"expected {expected.__name__}."
        )
    if isinstance(spec, ComponentSpec) and not dataclasses.is_dataclass(spec.config_class):
        raise PluginError(
            f"plugin '{plugin}': {kind} '{spec.name}' has a config_class that is not a dataclass."
        )


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY
