"""Strict validation of a merge config before any model is opened.

mergekit silently ignores parameter names a method does not declare and config
keys its schema does not know, so a typo such as ``pcb_rato`` merges with the
default instead of failing. Here every parameter name and value of a ``pcb``
config is checked against the method's own specs (so parameters other engineers
add to the method are covered automatically), with a did-you-mean for typos.
Settings pydantic would reject only with a report of every union member it tried
(``null``, a filter entry with a misspelt key) or that mergekit would read as "no
value" and silently replace by the default (``[]``) are caught on the raw YAML first.
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
    _unknown_keys(raw, list(model.model_fields), where)


def _unknown_keys(raw: Mapping, known: list[str], where: str, inside: str = "") -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}'{inside}{did_you_mean(str(key), known)} "
                f"(allowed keys: {', '.join(known)})"
            )


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _unknown_parameter(location: str, name: str, specs: dict) -> None:
    if name not in specs:
        raise ConfigError(
            f"{location}: unknown pcb parameter '{name}'{did_you_mean(name, list(specs))} "
            f"(allowed: {', '.join(specs)})"
        )


def _no_value(at: str, name: str, value: Any, specs: dict | None) -> ConfigError:
    shown = "null" if value is None else "[] (no value: mergekit would use the default)"
    parameter = getattr((specs or {}).get(name), "parameter", None)
    if parameter is not None:
        return ConfigError(
            f"pcb: {at}: parameter '{name}' got {shown}; allowed: {parameter.allowed}"
        )
    return ConfigError(
        f"{at}: got {shown}; allowed: a value, a gradient [a, b, ...] or a filter list "
        "[{filter: ..., value: ...}, ...]"
    )


def _check_setting(setting: Any, at: str, name: str, specs: dict | None) -> None:
    """The shape of one parameter setting: a scalar, a flat gradient, or filter entries."""
    from mergekit.config import ConditionalParameter

    def scalar_or_gradient(value: Any, at: str) -> None:
        if value is None or value == []:
            raise _no_value(at, name, value, specs)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if item is None or isinstance(item, (list, Mapping)):
                where = f"{at}[{i}]" if isinstance(value, list) else at
                raise ConfigError(
                    f"{where}: got {'null' if item is None else repr(item)}; allowed: a number "
                    "or string, or a gradient (a flat list of them)"
                )

    def entry(item: Any, at: str) -> None:
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"{at}: got {item!r} among filter entries; allowed: "
                "{filter: <part of a tensor name>, value: ...} entries only"
            )
        _unknown_keys(item, list(ConditionalParameter.model_fields), at, " in a filter entry")
        if "value" not in item:
            raise ConfigError(
                f"{at}: filter entry without 'value'; allowed: {{filter: ..., value: ...}}"
            )
        scalar_or_gradient(item["value"], f"{at}.value")

    if isinstance(setting, Mapping):
        entry(setting, at)
    elif isinstance(setting, list) and any(isinstance(item, Mapping) for item in setting):
        for i, item in enumerate(setting):
            entry(item, f"{at}[{i}]")
    else:
        scalar_or_gradient(setting, at)


def _check_settings(node: Any, where: str, specs: dict | None) -> None:
    """Names (for pcb) and shapes of the settings in ``node``'s ``parameters:``."""
    parameters = node.get("parameters") if isinstance(node, Mapping) else None
    for name, setting in parameters.items() if isinstance(parameters, Mapping) else ():
        location = f"{where}.parameters.{name}"
        if specs is not None:
            _unknown_parameter(location, str(name), specs)
        _check_setting(setting, location, str(name), specs)


def check_schema_keys(raw: dict, specs: dict | None = None) -> None:
    """Unknown keys anywhere mergekit's config schema would ignore them, and ill-shaped
    parameter settings (with ``specs``, a method's parameters, also unknown names)."""
    from mergekit.config import (
        InputModelDefinition,
        InputSliceDefinition,
        MergeConfiguration,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )

    def node(item: Any, model: type[BaseModel], where: str) -> None:
        _check_keys(item, model, where)
        _check_settings(item, where, specs)

    # Only well-shaped parts are walked; pydantic reports the ill-shaped ones next.
    def slices(items: Any, where: str) -> None:
        for i, item in enumerate(_list(items)):
            node(item, OutputSliceDefinition, f"{where}[{i}]")
            if isinstance(item, Mapping):
                for j, source in enumerate(_list(item.get("sources"))):
                    node(source, InputSliceDefinition, f"{where}[{i}].sources[{j}]")

    def models(items: Any, where: str) -> None:
        for i, item in enumerate(_list(items)):
            node(item, InputModelDefinition, f"{where}[{i}]")

    node(raw, MergeConfiguration, "config")
    models(raw.get("models"), "models")
    slices(raw.get("slices"), "slices")
    modules = raw.get("modules")
    for name, module in modules.items() if isinstance(modules, Mapping) else ():
        node(module, OutputModuleDefinition, f"modules.{name}")
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
        gradient = not any(isinstance(item, ConditionalParameter) for item in setting)
        for i, item in enumerate(setting):
            if gradient and isinstance(item, str) and len(setting) > 1:
                # mergekit interpolates a gradient's points as numbers: 'auto' cannot be one
                raise ConfigError(
                    f"pcb: {where}[{i}]: got {item!r} in a per-layer gradient, whose points "
                    "mergekit interpolates as numbers; allowed: numbers in a gradient, or "
                    f"{item!r} for some layers through a filter "
                    f"([{{filter: mlp, value: {item}}}, {{value: ...}}])"
                )
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
        _unknown_parameter(location, name, specs)
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


def merge_dtypes() -> list[str]:
    """The dtype names mergekit can merge in: what its ``dtype_from_name`` accepts,
    floating point only (mergekit refuses others at run time), asked of mergekit itself."""
    import torch
    from mergekit.common import dtype_from_name

    names = sorted(
        {str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)}
    )
    allowed = []
    for name in names:
        try:
            if dtype_from_name(name).is_floating_point:
                allowed.append(name)
        except RuntimeError:
            pass
    return allowed


def check_dtypes(config: Any, source: str) -> None:
    """``dtype`` / ``out_dtype`` now, not as mergekit's error after loading began."""
    from mergekit.common import dtype_from_name

    for key in ("dtype", "out_dtype"):
        value = getattr(config, key, None)
        if value is None:
            continue
        try:
            ok = dtype_from_name(value).is_floating_point
        except RuntimeError:
            ok = False
        if not ok:
            allowed = merge_dtypes()
            raise ConfigError(
                f"{source}: {key}: '{value}' is not a dtype mergekit merges in "
                f"(allowed: {', '.join(allowed)})"
            )


def _method(name: Any, source: str):
    """The registered method ``name`` names; None where the name is not even a string."""
    # Importing this module ran mergekit_pcb's __init__, which armed the registration
    # hook (even where autoload is opted out): loading the registry registers pcb.
    from mergekit import merge_methods

    if not isinstance(name, str):
        return None  # pydantic reports it
    try:
        return merge_methods.get(name)
    except RuntimeError:
        known = sorted(m.spec.name for m in merge_methods.registered_methods())
        raise ConfigError(
            f"{source}: merge_method '{name}' is not registered"
            f"{did_you_mean(name, known)} (allowed: {', '.join(known)})"
        ) from None


def validate_config(text: str, source: str = "config"):
    """Parse and check a config; returns mergekit's ``MergeConfiguration``.

    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    return validate_mapping(load_yaml(text, source), source)


def validate_mapping(raw: dict, source: str = "config"):
    """:func:`validate_config` of a parsed YAML mapping (one document of a multi-merge)."""
    from mergekit.config import MergeConfiguration

    method = _method(raw.get("merge_method"), source)
    specs = None
    if method is not None and method.spec.name == "pcb":
        specs = {spec.name: spec for spec in method.spec.parameters}
    check_schema_keys(raw, specs)
    try:
        config = MergeConfiguration.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {format_validation_error(error)}") from None
    except (RuntimeError, ValueError) as error:  # mergekit's model validators raise these
        raise ConfigError(f"{source}: {error}") from None
    check_dtypes(config, source)
    if specs is not None:
        check_pcb(config, specs)
    return config


__all__ = ["ConfigError", "validate_config", "validate_mapping"]
