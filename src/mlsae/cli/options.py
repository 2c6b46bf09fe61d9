"""The CLI derived from the configuration dataclasses: `@config_command` turns every parameter of
a command that is annotated with a config dataclass into one option per field. The option is
`--field-name`, its help is the field's docstring, its type and default are the field's (Literal
choices are listed by `--help`), and the command receives the dataclass, built (and so
validated) once from the options. Which fields the user typed is available as `Given`, so a
command can fill the others from a saved run or SAE (`mlsae train --resume`, `--model` defaulting
to the SAE's model).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

from mlsae.core.schema import hints


class Given(dict[str, set[str]]):
    """{config parameter name: the fields the user gave on the command line}."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (its attribute docstring), one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef)
    body = node.body
    out: dict[str, str] = {}
    for a, b in zip(body, body[1:], strict=False):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            out[a.target.id] = " ".join(b.value.value.split())
    return out


_CTX = "_mlsae_ctx"
"""The wrapper's hidden parameter that receives the click context (typer injects it)."""


def _typed(ctx: typer.Context | None, param: str) -> bool:
    """Whether the user gave the option `param` (on the command line or in the environment)."""
    source = None if ctx is None else ctx.get_parameter_source(param)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def option_name(field: str) -> str:
    """`--field-name` for a field `field_name`."""
    return "--" + field.replace("_", "-")


@dataclasses.dataclass
class _Expanded:
    param: str  # the command's parameter name
    cls: type
    fields: list[str]  # expanded fields, in order
    fixed: dict[str, Any]  # fields set by the command, not options


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...  # required


@dataclasses.dataclass
class _Spec:
    """config_command's per-command choices (see there); keys are field names."""

    defaults: dict[str, Any]
    exclude: set[str] | frozenset[str]
    fixed: dict[str, Any]
    aliases: dict[str, list[str]]
    help_overrides: dict[str, str]


def config_command(
    app: typer.Typer,
    name: str | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    exclude: set[str] | frozenset[str] = frozenset(),
    fixed: Mapping[str, Any] | None = None,
    aliases: Mapping[str, list[str]] | None = None,
    help_overrides: Mapping[str, str] | None = None,
    **typer_kw: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` on `app`, expanding its config-dataclass parameters into options.

    defaults: per-command defaults of fields (shown by --help); exclude: fields not offered
    (they keep their default); fixed: fields set by the command; aliases: extra option names;
    help_overrides: a command-specific help text for a field. Keys are field names.
    """
    spec = _Spec(
        dict(defaults or {}),
        exclude,
        dict(fixed or {}),
        dict(aliases or {}),
        dict(help_overrides or {}),
    )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params, expanded = _parameters(fn, spec)
        wrapper = _wrapper(fn, expanded, takes_given="given" in inspect.signature(fn).parameters)
        setattr(wrapper, "__signature__", inspect.Signature(params))  # noqa: B010 - typer reads it
        setattr(wrapper, "expanded", expanded)  # noqa: B010 - for tests and docs
        app.command(name, **typer_kw)(wrapper)
        return wrapper

    return decorate


def _parameters(
    fn: Callable[..., Any], spec: _Spec
) -> tuple[list[inspect.Parameter], list[_Expanded]]:
    """The command's typer parameters (its own, and one option per field of each config
    dataclass parameter, keyword-only, those without defaults first, then typer's context) and
    what was expanded."""
    sig = inspect.signature(fn, eval_str=True)
    fn_hints = typing.get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    expanded: list[_Expanded] = []
    seen: dict[str, str] = {}
    for p in sig.parameters.values():
        tp = fn_hints.get(p.name, p.annotation)
        if p.name == "given":
            continue
        if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
            params.append(p.replace(annotation=tp))
            continue
        ex = _Expanded(p.name, tp, [], {})
        params += _field_options(fn.__name__, ex, spec, seen)
        expanded.append(ex)
    # typer wants parameters without defaults first
    params.sort(key=lambda q: q.default is not inspect.Parameter.empty)
    params = [q.replace(kind=inspect.Parameter.KEYWORD_ONLY) for q in params]
    # typer passes its click context to a parameter annotated typer.Context (its own
    # vendored click since typer 0.22: click.get_current_context() does not see it)
    params.append(inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    return params, expanded


def _field_options(
    fn_name: str, ex: _Expanded, spec: _Spec, seen: dict[str, str]
) -> list[inspect.Parameter]:
    """One option parameter per offered field of the dataclass `ex.cls` (filling `ex.fields`
    and `ex.fixed`); `seen` (option -> dataclass) catches an option offered twice."""
    tp = ex.cls
    docs, types = field_docs(tp), hints(tp)
    params = []
    for f in dataclasses.fields(tp):
        if not f.init:
            continue
        if f.name in spec.fixed:
            ex.fixed[f.name] = spec.fixed[f.name]
            continue
        if f.name in spec.exclude:
            continue
        opt = option_name(f.name)
        if opt in seen:
            raise TypeError(f"{fn_name}: option {opt} from {tp.__name__} and {seen[opt]}")
        seen[opt] = tp.__name__
        help_text = spec.help_overrides.get(f.name) or docs.get(f.name)
        if not help_text:
            raise TypeError(f"{tp.__name__}.{f.name} has no docstring: it is an option's help")
        decls = [opt, *spec.aliases.get(f.name, [])]
        default = spec.defaults.get(f.name, _field_default(f))
        if types[f.name] is bool and default is True:  # on by default: --no-x turns it off
            decls[0] = f"{opt}/--no-{opt[2:]}"
        info = typer.Option(*decls, help=help_text)
        ann = Annotated[types[f.name], info]  # type: ignore[valid-type]
        params.append(
            inspect.Parameter(
                f"{ex.param}__{f.name}",
                inspect.Parameter.KEYWORD_ONLY,
                default=default if default is not ... else inspect.Parameter.empty,
                annotation=ann,
            )
        )
        ex.fields.append(f.name)
    return params


def _wrapper(
    fn: Callable[..., Any], expanded: list[_Expanded], takes_given: bool
) -> Callable[..., Any]:
    """What typer calls: builds each config dataclass from its options (and `given`, the
    fields typed on the command line) and calls `fn`."""

    def wrapper(**kwargs: Any) -> Any:
        ctx: typer.Context | None = kwargs.pop(_CTX, None)
        given = Given()
        for ex in expanded:
            values = {f: kwargs.pop(f"{ex.param}__{f}") for f in ex.fields}
            for f, v in values.items():
                if isinstance(v, tuple) and typing.get_origin(hints(ex.cls)[f]) is list:
                    values[f] = list(v)
            given[ex.param] = {
                f for f in ex.fields if ctx is not None and _typed(ctx, f"{ex.param}__{f}")
            }
            kwargs[ex.param] = ex.cls(**values, **ex.fixed)
        if takes_given:
            kwargs["given"] = given
        return fn(**kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
