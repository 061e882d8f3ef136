"""One registry for every component kind.

A component is registered under ``"<kind>.<name>"`` (``callback.early_stopping``) and built
from a config section ``{type: name, args: {...}}``; the kind comes from the section.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import pydantic

from oiafed.exceptions import ConfigError, RegistryError

logger = logging.getLogger(__name__)

KINDS = ("callback", "aggregator", "learner", "trainer", "model", "dataset", "partitioner")
_BUILTIN_MODULES = (
    "oiafed.callbacks",
    "oiafed.core.aggregators",
    "oiafed.core.learner",
    "oiafed.core.trainer",
    "oiafed.models",
    "oiafed.data.datasets",
    "oiafed.data.partition",
)

_by_name: dict[str, Any] = {}
_name_by_obj: dict[Any, str] = {}
_builtins_loaded = False

T = TypeVar("T")


def _split(full_name: str) -> tuple[str, str]:
    kind, sep, name = full_name.partition(".")
    if not sep or not name or kind not in KINDS:
        raise RegistryError(
            f"registry names look like '<kind>.<name>' with kind one of {', '.join(KINDS)}; "
            f"got {full_name!r}",
            name=full_name,
        )
    return kind, name


def register(full_name: str) -> Callable[[T], T]:
    """Register a class (or factory function) under ``"<kind>.<name>"``.

    Registering a name again replaces the earlier entry (with a warning when the object
    differs), so a module can be re-run and a built-in can be overridden on purpose.

    Example:
        >>> @register("callback.print_progress")
        ... class PrintProgress(Callback): ...
    """
    _split(full_name)

    def decorator(obj: T) -> T:
        previous = _by_name.get(full_name)
        if previous is not None and previous is not obj:
            same_origin = getattr(previous, "__qualname__", None) == getattr(
                obj, "__qualname__", None
            ) and getattr(previous, "__module__", None) == getattr(obj, "__module__", None)
            log = logger.debug if same_origin else logger.warning
            log("registry: %s now refers to %r (was %r)", full_name, obj, previous)
            if _name_by_obj.get(previous) == full_name:
                del _name_by_obj[previous]  # the old object no longer has this name
        _by_name[full_name] = obj
        _name_by_obj[obj] = full_name
        return obj

    return decorator


def load_builtins() -> None:
    """Import the modules that register the built-in components (once)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def import_modules(modules: list[str], path: str = "imports") -> None:
    """Import user modules (that register components) named by a config's ``imports``."""
    for i, module in enumerate(modules):
        try:
            importlib.import_module(module)
        except Exception as exc:  # a user module may fail in any way; report which one
            raise ConfigError(f"cannot import module {module!r}: {type(exc).__name__}: {exc}",
                              f"{path}[{i}]") from exc


def names(kind: str | None = None) -> list[str]:
    """Sorted full names registered for ``kind`` (or for every kind)."""
    load_builtins()
    return sorted(n for n in _by_name if kind is None or n.startswith(kind + "."))


def get(kind: str, name: str, path: str | None = None) -> Any:
    """The object registered as ``<kind>.<name>``; a clear error with suggestions otherwise."""
    load_builtins()
    if kind not in KINDS:
        raise RegistryError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}", name=kind)
    full = name if name.startswith(kind + ".") else f"{kind}.{name}"
    if full in _by_name:
        return _by_name[full]
    known = [n.split(".", 1)[1] for n in names(kind)]
    close = difflib.get_close_matches(full.split(".", 1)[1], known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RegistryError(
        f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known) or '(none)'}",
        name=full,
        known=known,
        suggestion=close[0] if close else None,
        path=path,
    )


def name_of(obj: Any) -> str | None:
    """The registry name of a class or factory, or of an instance's class."""
    if obj in _name_by_obj:
        return _name_by_obj[obj]
    return _name_by_obj.get(type(obj))


@functools.lru_cache(maxsize=256)
def _args_model(target: Any, injected: frozenset[str]) -> type[pydantic.BaseModel] | None:
    """A pydantic model of the config arguments ``target`` accepts (None: accepts anything)."""
    try:
        signature = inspect.signature(target, eval_str=True)
    except (NameError, TypeError, ValueError):
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return None
    fields: dict[str, Any] = {}
    extra: Literal["allow", "forbid"] = "forbid"
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            extra = "allow"
            continue
        if param.kind is param.VAR_POSITIONAL or param.name in injected:
            continue
        annotation = param.annotation
        if annotation is param.empty or isinstance(annotation, str):
            annotation = Any
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    config = pydantic.ConfigDict(extra=extra, arbitrary_types_allowed=True, strict=False)
    return pydantic.create_model(f"{getattr(target, '__name__', 'Args')}Args", __config__=config, **fields)


def validate_args(target: Any, args: Mapping[str, Any], path: str, injected: set[str]) -> dict:
    """Check ``args`` against ``target``'s signature; return them converted to its types."""
    for key in args:
        if key in injected:
            raise ConfigError(f"{key!r} is set by oiafed, not by the config", f"{path}.{key}")
    model = _args_model(target, frozenset(injected))
    if model is None:
        return dict(args)
    try:
        validated = model.model_validate(dict(args))
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            message = "unknown argument" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{path}.{loc}: {message}")
        raise ConfigError("; ".join(problems)) from exc
    values = {key: getattr(validated, key) for key in validated.model_fields_set}
    values.update(validated.model_extra or {})
    return values


def build(kind: str, spec: Mapping[str, Any], path: str | None = None, **injected: Any) -> Any:
    """Build a component from ``{type, args}``; ``injected`` are arguments oiafed supplies."""
    path = path or kind
    target = get(kind, spec["type"], path=f"{path}.type")
    args = validate_args(target, spec.get("args") or {}, f"{path}.args", set(injected))
    try:
        return target(**args, **injected)
    except ConfigError as exc:
        if exc.path:
            raise
        raise ConfigError(str(exc), f"{path}.args") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), f"{path}.args") from exc
