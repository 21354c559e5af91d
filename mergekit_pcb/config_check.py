"""Strict validation of a merge config before any model is opened.

mergekit silently ignores parameter names a method does not declare and config
keys its schema does not know, so a typo such as ``pcb_rato`` merges with the
default instead of failing. Here every parameter name and value of a ``pcb``
config is checked against the method's own specs (so parameters other engineers
add to the method are covered automatically), with a did-you-mean for typos.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from mergekit_pcb.config_errors import (
    ConfigError,
    did_you_mean,
    format_validation_error,
    load_yaml,
)


def _check_keys(raw: Any, model: type[BaseModel], where: str) -> None:
    """Reject keys the pydantic schema would silently drop (e.g. ``paramters:``)."""
    if not isinstance(raw, Mapping):
        return
    known = list(model.model_fields)
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}'{did_you_mean(str(key), known)} "
                f"(allowed keys: {', '.join(known)})"
            )


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def check_schema_keys(raw: dict) -> None:
    """Unknown keys anywhere mergekit's config schema would ignore them."""
    from mergekit.config import (
        InputModelDefinition,
        InputSliceDefinition,
        MergeConfiguration,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )

    # Only well-shaped parts are walked; pydantic reports the ill-shaped ones next.
    def slices(items: Any, where: str) -> None:
        for i, item in enumerate(_list(items)):
            _check_keys(item, OutputSliceDefinition, f"{where}[{i}]")
            if isinstance(item, Mapping):
                for j, source in enumerate(_list(item.get("sources"))):
                    _check_keys(source, InputSliceDefinition, f"{where}[{i}].sources[{j}]")

    def models(items: Any, where: str) -> None:
        for i, item in enumerate(_list(items)):
            _check_keys(item, InputModelDefinition, f"{where}[{i}]")

    _check_keys(raw, MergeConfiguration, "config")
    models(raw.get("models"), "models")
    slices(raw.get("slices"), "slices")
    modules = raw.get("modules")
    for name, module in modules.items() if isinstance(modules, Mapping) else ():
        _check_keys(module, OutputModuleDefinition, f"modules.{name}")
        if isinstance(module, Mapping):
            models(module.get("models"), f"modules.{name}.models")
            slices(module.get("slices"), f"modules.{name}.slices")


def _leaf_values(setting: Any, where: str) -> Iterator[tuple[Any, str]]:
    """Every scalar a setting can resolve to, with its location.

    Gradients interpolate linearly between their points, so checking the points
    also covers every interpolated value for the interval domains pcb uses.
    """
    from mergekit.config import ConditionalParameter

    if isinstance(setting, ConditionalParameter):
        yield from _leaf_values(setting.value, f"{where}[filter={setting.filter!r}]")
    elif isinstance(setting, list):
        for i, item in enumerate(setting):
            yield from _leaf_values(item, f"{where}[{i}]")
    else:
        yield setting, where


def _check_parameters(
    parameters: Mapping[str, Any] | None,
    where: str,
    specs: dict,
    *,
    per_model: bool,
    is_base: bool = False,
) -> None:
    from mergekit.merge_methods.base import ParameterScope

    for name, setting in (parameters or {}).items():
        location = f"{where}.parameters.{name}"
        if name not in specs:
            raise ConfigError(
                f"{location}: unknown pcb parameter '{name}'{did_you_mean(name, list(specs))} "
                f"(allowed: {', '.join(specs)})"
            )
        spec = specs[name]
        if per_model and spec.scope == ParameterScope.SHARED:
            raise ConfigError(
                f"{location}: '{name}' is shared by all models and mergekit ignores it here; "
                "allowed: set it in the top-level or slice 'parameters:'"
            )
        if is_base and spec.scope == ParameterScope.NON_BASE:
            raise ConfigError(
                f"{location}: '{name}' has no effect on the base model; "
                "allowed: set it on the fine-tuned models"
            )
        for value, at in _leaf_values(setting, location):
            try:
                spec.validate(value)
            except ValidationError as error:  # a spec without its own message
                raise ConfigError(f"pcb: {at}: {format_validation_error(error)}") from None
            except ValueError as error:  # BoundedFloat's message already says what is allowed
                raise ConfigError(f"pcb: {at}: {str(error).removeprefix('pcb: ')}") from None


def check_pcb(config: Any, specs: dict) -> None:
    """Names, scopes and values of every pcb parameter, plus the base model."""
    base = config.base_model

    def sources(items: Any, where: str, slice_base: Any = None) -> None:
        own_base = slice_base or base
        for i, item in enumerate(items or []):
            _check_parameters(
                item.parameters,
                f"{where}[{i}]",
                specs,
                per_model=True,
                is_base=own_base is not None and item.model == own_base,
            )

    def slices(items: Any, where: str) -> None:
        for i, item in enumerate(items or []):
            _check_parameters(item.parameters, f"{where}[{i}]", specs, per_model=False)
            if (item.base_model or base) is None:
                _missing_base(f"{where}[{i}]")
            sources(item.sources, f"{where}[{i}].sources", item.base_model)

    _check_parameters(config.parameters, "config", specs, per_model=False)
    sources(config.models, "models")
    slices(config.slices, "slices")
    for name, module in (config.modules or {}).items():
        _check_parameters(module.parameters, f"modules.{name}", specs, per_model=False)
        sources(module.models, f"modules.{name}.models")
        slices(module.slices, f"modules.{name}.slices")
    if (config.models or config.modules) and base is None:
        _missing_base("config")


def _missing_base(where: str) -> None:
    raise ConfigError(
        f"{where}: 'base_model' is missing; allowed: set base_model to the model the others "
        "were fine-tuned from (pcb merges task vectors taken against it)"
    )


def validate_config(text: str, source: str = "config"):
    """Parse and check a config; returns mergekit's ``MergeConfiguration``.

    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    from mergekit.config import MergeConfiguration

    raw = load_yaml(text, source)
    check_schema_keys(raw)
    try:
        config = MergeConfiguration.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {format_validation_error(error)}") from None
    except (RuntimeError, ValueError) as error:  # mergekit's model validators raise these
        raise ConfigError(f"{source}: {error}") from None

    from mergekit import merge_methods

    import mergekit_pcb

    mergekit_pcb.register()  # even when autoload is opted out

    try:
        method = merge_methods.get(config.merge_method)
    except RuntimeError:
        known = sorted(m.spec.name for m in merge_methods.registered_methods())
        raise ConfigError(
            f"{source}: merge_method '{config.merge_method}' is not registered"
            f"{did_you_mean(config.merge_method, known)} (allowed: {', '.join(known)})"
        ) from None
    if method.spec.name == "pcb":
        check_pcb(config, {spec.name: spec for spec in method.spec.parameters})
    return config


__all__ = ["ConfigError", "validate_config"]
