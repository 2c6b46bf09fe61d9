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
    defaults, fixed = dict(defaults or {}), dict(fixed or {})
    aliases, help_overrides = dict(aliases or {}), dict(help_overrides or {})

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
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
            docs, types = field_docs(tp), hints(tp)
            ex = _Expanded(p.name, tp, [], {})
            for f in dataclasses.fields(tp):
                if not f.init:
                    continue
                if f.name in fixed:
                    ex.fixed[f.name] = fixed[f.name]
                    continue
                if f.name in exclude:
                    continue
                opt = option_name(f.name)
                if opt in seen:
                    raise TypeError(
                        f"{fn.__name__}: option {opt} from {tp.__name__} and {seen[opt]}"
                    )
                seen[opt] = tp.__name__
                help_text = help_overrides.get(f.name) or docs.get(f.name)
                if not help_text:
                    raise TypeError(
                        f"{tp.__name__}.{f.name} has no docstring: it is an option's help"
                    )
                decls = [opt, *aliases.get(f.name, [])]
                default = defaults.get(f.name, _field_default(f))
                if types[f.name] is bool and default is True:  # on by default: --no-x turns it off
                    decls[0] = f"{opt}/--no-{opt[2:]}"
                info = typer.Option(*decls, help=help_text)
                ann = Annotated[types[f.name], info]  # type: ignore[valid-type]
                params.append(
                    inspect.Parameter(
                        f"{p.name}__{f.name}",
                        inspect.Parameter.KEYWORD_ONLY,
                        default=default if default is not ... else inspect.Parameter.empty,
                        annotation=ann,
                    )
                )
                ex.fields.append(f.name)
            expanded.append(ex)
        takes_given = "given" in sig.parameters
        # typer wants parameters without defaults first
        params.sort(key=lambda q: q.default is not inspect.Parameter.empty)
        params = [q.replace(kind=inspect.Parameter.KEYWORD_ONLY) for q in params]
        # typer passes its click context to a parameter annotated typer.Context (its own
        # vendored click since typer 0.22: click.get_current_context() does not see it)
        params.append(
            inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        )

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
        setattr(wrapper, "__signature__", inspect.Signature(params))  # noqa: B010 - typer reads it
        setattr(wrapper, "expanded", expanded)  # noqa: B010 - for tests and docs
        app.command(name, **typer_kw)(wrapper)
        return wrapper

    return decorate
