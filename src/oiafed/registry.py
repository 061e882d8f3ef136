"""One registry for every component kind.

A component is registered under ``"<kind>.<name>"`` (``callback.early_stopping``) and built
from a config section ``{type: name, args: {...}}``; the kind comes from the section.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pydantic

from oiafed.exceptions import ConfigError, RegistryError

logger = logging.getLogger(__name__)

KINDS = ("callback", "aggregator", "learner", "trainer", "model", "dataset", "partitioner",
         "attack", "privacy")
_BUILTIN_MODULES = (
    "oiafed.callbacks",
    "oiafed.core.aggregators",
    "oiafed.core.learner",
    "oiafed.core.trainer",
    "oiafed.models",
    "oiafed.data.datasets",
    "oiafed.data.partition",
    "oiafed.algorithms",
    "oiafed.attacks",
    "oiafed.privacy",
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


def resolve_imports(modules: list[str], folder: str | Path | None = None) -> list[str]:
    """A config's ``imports`` as the loaded config holds them: a path ending in ``.py`` made
    absolute (relative to ``folder``, the config file's, else to the working directory), and a
    plain module name that is a file (``name.py``) or package in ``folder`` turned into that
    file's absolute path; other names are kept. The run folder's ``config.yaml`` and a
    resumed run then import the same files from anywhere."""
    base = Path(os.path.abspath(folder if folder is not None else os.curdir))
    resolved = []
    for entry in modules:
        if entry.endswith(".py"):
            entry = os.path.normpath(base / os.path.expanduser(entry))
        elif folder is not None and entry.isidentifier():
            for candidate in (base / f"{entry}.py", base / entry / "__init__.py"):
                if candidate.is_file():
                    entry = str(candidate)
                    break
        resolved.append(entry)
    return resolved


def import_modules(modules: list[str], path: str = "imports", folder: str | Path | None = None) -> None:
    """Import the user modules (that register components) of a config's ``imports``.

    A module name is looked for on ``sys.path``, then in ``folder`` (the config file's) and the
    working directory. A path ending in ``.py`` is imported as the module named by its stem
    (a package's ``__init__.py``: the package). The folder a module is found in goes on
    ``sys.path``, so processes started from this one (parallel workers, gRPC clients, a local
    Ray instance) find it too.
    """
    for i, module in enumerate(modules):
        where = f"{path}[{i}]"
        if module.endswith(".py"):
            name, file = _module_of_file(module, where), f" (file {module})"
        else:
            name, file = _locate(module, folder, where), ""
        try:
            importlib.import_module(name)
        except Exception as exc:  # a user module may fail in any way; report which one
            raise ConfigError(f"cannot import module {name!r}: {type(exc).__name__}: {exc}{file}",
                              where) from exc


def _on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.append(folder)
        importlib.invalidate_caches()


def _spec_origin(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _locate(module: str, folder: str | Path | None, where: str) -> str:
    """``module``, once its top-level package can be imported (a folder added to ``sys.path``)."""
    top = module.partition(".")[0]
    try:
        if importlib.util.find_spec(top) is not None:
            return module
    except (ImportError, ValueError):
        return module  # the import itself reports it
    looked: dict[str, str] = {}
    for place, label in ((folder, "the config's folder"), (os.curdir, "the working directory")):
        if place is None or os.path.abspath(place) in looked:
            continue
        looked[os.path.abspath(place)] = label
        if importlib.machinery.PathFinder.find_spec(top, [os.path.abspath(place)]) is not None:
            _on_path(os.path.abspath(place))
            return module
    where_not = " nor in ".join(f"{place} ({label})" for place, label in looked.items())
    raise ConfigError(
        f"cannot import module {module!r}: no module {top!r} on the Python path (sys.path) nor "
        f"in {where_not}; put {top}.py beside the config, give its path ending in .py "
        "(relative to the config's folder) or set PYTHONPATH", where)


def _module_of_file(file: str, where: str) -> str:
    """The module name of a ``.py`` file, its folder on ``sys.path``; a file not found here (a
    node of a Ray cluster, say) is looked for by that name."""
    path = Path(os.path.abspath(file))
    package = path.name == "__init__.py"
    name = path.parent.name if package else path.stem
    if not name.isidentifier():
        raise ConfigError(f"cannot import {file}: {name!r} is not a module name; rename it", where)
    if not path.is_file():
        if _spec_origin(name) is None:
            raise ConfigError(f"cannot import {file}: no such file (a relative path in imports "
                              "is relative to the config file's folder)", where)
        return name
    _on_path(str(path.parent.parent if package else path.parent))
    origin = _spec_origin(name)
    if origin is None or os.path.realpath(origin) != os.path.realpath(path):
        raise ConfigError(f"cannot import {file}: the module name {name!r} is taken by "
                          f"{origin or 'another module'}; rename the file", where)
    return name


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


def _signature(target: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(target, eval_str=True)
    except (NameError, TypeError, ValueError):
        try:
            return inspect.signature(target)
        except (TypeError, ValueError):
            return None


def _type_text(annotation: Any) -> str:
    """``int``, ``list[int]``, ``Literal['max', 'min']``: a type as a config's author reads it."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any value"
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("collections.abc.", "")


def _label(target: Any) -> str:
    """``cnn``, ``the default trainer``: how an error names a component."""
    full = name_of(target)
    if not full:
        return str(getattr(target, "__name__", "the component"))
    kind, name = full.split(".", 1)
    return f"the default {kind}" if name == "default" else name


@dataclass(frozen=True)
class ArgumentInfo:
    """One config argument of a component: its name, type and default (None: required)."""

    name: str
    type: str
    default: str | None


@dataclass(frozen=True)
class ComponentInfo:
    """What ``oiafed list KIND NAME`` shows of a component."""

    name: str
    summary: str
    """The first line of its docstring ("" without one)."""
    arguments: list[ArgumentInfo]
    any_other: bool
    """It takes other keyword arguments too (``**kwargs``)."""
    injected: list[str]
    """Arguments oiafed passes itself."""


def describe(kind: str, name: str, injected: frozenset[str] | set[str] = frozenset()) -> ComponentInfo:
    """The docstring's first line and the config arguments of ``<kind>.<name>``
    (``injected``: the arguments oiafed passes, listed apart)."""
    target = get(kind, name)
    doc = inspect.cleandoc(target.__doc__) if isinstance(target.__doc__, str) else ""
    signature = _signature(target)
    arguments, set_by_oiafed, any_other = [], [], signature is None
    for param in signature.parameters.values() if signature is not None else []:
        if param.kind is param.VAR_KEYWORD:
            any_other = True
        elif param.kind is param.VAR_POSITIONAL:
            continue
        elif param.name in injected:
            set_by_oiafed.append(param.name)
        else:
            default = param.default
            text = None if default is param.empty else repr(list(default) if isinstance(
                default, tuple) else default)
            arguments.append(ArgumentInfo(param.name, _type_text(param.annotation), text))
    return ComponentInfo(name_of(target) or name, doc.split("\n", 1)[0] if doc else "", arguments,
                         any_other, set_by_oiafed)


@functools.lru_cache(maxsize=256)
def _args_model(target: Any, injected: frozenset[str]) -> type[pydantic.BaseModel] | None:
    """A pydantic model of the config arguments ``target`` accepts (None: accepts anything)."""
    signature = _signature(target)
    if signature is None:
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
        raise ConfigError("; ".join(_problem(target, model, args, path, err)
                                    for err in exc.errors())) from exc
    values = {key: getattr(validated, key) for key in validated.model_fields_set}
    values.update(validated.model_extra or {})
    return values


def _problem(target: Any, model: type[pydantic.BaseModel], args: Mapping[str, Any], path: str,
             err: Any) -> str:
    """One argument error, saying whose argument it is and what it expects: ``model.args.hidden:
    cnn's argument hidden expects int, got [64]: Input should be a valid integer``."""
    if not err["loc"]:
        return f"{path}: {err['msg']}"
    key, inner = str(err["loc"][0]), ".".join(str(p) for p in err["loc"][1:])
    who, field = _label(target), model.model_fields.get(key)
    if err["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields) or "no arguments"
        return f"{path}.{key}: unknown argument; {who} takes {known}"
    expects = _type_text(field.annotation) if field is not None else "another value"
    if err["type"] == "missing":
        return f"{path}.{key}: {who}'s argument {key} is required ({expects})"
    detail = f"item {inner}: {err['msg']}" if inner else err["msg"]
    return f"{path}.{key}: {who}'s argument {key} expects {expects}, got {args.get(key)!r}: {detail}"


def build(kind: str, spec: Mapping[str, Any], path: str | None = None, **injected: Any) -> Any:
    """Build a component from ``{type, args}``; ``injected`` are arguments oiafed supplies."""
    path = path or kind
    target = get(kind, spec["type"], path=f"{path}.type")
    args = validate_args(target, spec.get("args") or {}, f"{path}.args", set(injected))
    try:
        return target(**args, **injected)
    except ConfigError as exc:
        if exc.path in args:  # the constructor named one of its arguments: give the full key
            message = str(exc).removeprefix(f"{exc.path}: ")
            raise ConfigError(message, f"{path}.args.{exc.path}") from exc
        if exc.path:
            raise
        raise ConfigError(str(exc), f"{path}.args") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), f"{path}.args") from exc


def _plain(value: Any) -> bool:
    """Whether a YAML file holds ``value`` as it is (None, bool, numbers, text, lists, maps)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def with_defaults(target: Any, args: Mapping[str, Any], injected: set[str]) -> dict[str, Any]:
    """``args`` with every other argument ``target`` takes set to its default, in the
    signature's order: the values it runs with, as a config can hold them (defaults a config
    cannot hold, or that its checks would refuse, are left out)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return dict(args)
    defaults = {
        p.name: list(p.default) if isinstance(p.default, tuple) else p.default
        for p in signature.parameters.values()
        if p.default is not p.empty and p.name not in args and p.name not in injected
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and _plain(p.default)
    }
    try:
        validate_args(target, {**args, **defaults}, "args", injected)
    except ConfigError:  # keep only the defaults the checks take one by one
        defaults = {name: value for name, value in defaults.items()
                    if _accepts(target, {**args, name: value}, injected)}
    ordered = {name: defaults[name] if name in defaults else args[name]
               for name in signature.parameters if name in defaults or name in args}
    return {**ordered, **{k: v for k, v in args.items() if k not in ordered}}


def _accepts(target: Any, args: Mapping[str, Any], injected: set[str]) -> bool:
    try:
        validate_args(target, args, "args", injected)
    except ConfigError:
        return False
    return True
