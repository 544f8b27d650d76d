"""Command-line pieces every ftz-* tool shares: one-line usage errors and number types.

Stdlib only: the torch-free front ends (ftz-chat, ftz-demo, ftz-serve, ftz-doctor) import it on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr ("PROG: error: ..."), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """An argparse type: a float that is a number (not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# -- options generated from a dataclass ------------------------------------------------------

class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()  # Flag.default when the option's default comes from the field's


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one dataclass field is spelled on the command line, where the field alone does not say.

    Every attribute may also be given in the field's own ``metadata`` (``field(metadata={"help": ...,
    "choices": ...})``); a Flag passed to :class:`DataclassOptions` wins over the metadata.
    """

    flag: Optional[str] = None  # default: --field-name (--no-field-name for a bool that defaults to True)
    help: Optional[str] = None
    choices: Optional[Sequence[Any]] = None
    type: Optional[Callable[[str], Any]] = None  # default: from the annotation
    metavar: Optional[str] = None
    default: Any = UNSET  # the option's default, in its own units; default: from the field's
    from_field: Optional[Callable[[Any], Any]] = None  # field default -> option default (bytes -> MiB)
    to_field: Optional[Callable[[Any], Any]] = None  # option value -> field value (MiB -> bytes)
    required: bool = False


_FLAG_KEYS = tuple(f.name for f in dataclasses.fields(Flag))


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


class DataclassOptions:
    """argparse options generated from a dataclass's fields, and the dataclass back from the parse.

    Each field becomes ``--field-name`` with the field's default; its annotation gives the type
    (int, float as :func:`finite_float`, str, Path; ``Optional[...]`` of those; ``bool`` as a
    switch: ``--x`` when it defaults to False, ``--no-x`` when to True; ``List[...]`` as a
    repeatable option). ``skip`` names fields with no option (their dataclass default is kept);
    ``flags`` renames or retypes fields (:class:`Flag`). A field the generator cannot spell, or a
    name in ``skip`` / ``flags`` that is not a field, is a TypeError when the parser is built, so a
    field added to the dataclass is either on the command line or explicitly skipped.

        options = DataclassOptions(ExportOptions, flags={"cpu_int8": Flag(help=...)})
        options.add_to(parser)
        config = options.build(parser.parse_args(argv))
    """

    def __init__(self, cls, *, skip: Iterable[str] = (), flags: Optional[Mapping[str, Flag]] = None):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        self.cls = cls
        self.skip = tuple(skip)
        flags = dict(flags or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted((set(self.skip) | set(flags)) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        self._specs: dict[str, dict] = {}
        for f in dataclasses.fields(cls):
            if f.name not in self.skip and f.init:  # an init=False field is not the caller's to set
                self._specs[f.name] = self._spec(f, hints[f.name], flags.get(f.name))

    @property
    def exposed(self) -> dict[str, str]:
        """field name -> its option (``--max-request-mb``)."""
        return {name: spec["flag"] for name, spec in self._specs.items()}

    def _spec(self, f: dataclasses.Field, annotation, override: Optional[Flag]) -> dict:
        given = {k: f.metadata[k] for k in _FLAG_KEYS if k in f.metadata}
        if override is not None:
            given.update({k: getattr(override, k) for k in _FLAG_KEYS
                          if getattr(override, k) is not getattr(Flag, k)})
        spec = Flag(**given)
        if f.default is not dataclasses.MISSING:
            field_default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            field_default = f.default_factory()
        else:
            field_default = None
        if spec.default is not UNSET:
            default = spec.default
        else:
            default = spec.from_field(field_default) if spec.from_field and field_default is not None else field_default
        inner, _ = _unwrap_optional(annotation)
        kwargs: dict[str, Any] = {"help": spec.help, "dest": f.name}
        dashed = f.name.replace("_", "-")
        if inner is bool and spec.type is None:
            if default is True:
                flag = spec.flag or f"--no-{dashed}"
                kwargs.update(action="store_false", default=True)
            elif default in (False, None):
                flag = spec.flag or f"--{dashed}"
                kwargs.update(action="store_true", default=default)
            else:
                raise TypeError(f"{self.cls.__name__}.{f.name}: a bool option needs a bool default")
        else:
            flag = spec.flag or f"--{dashed}"
            element = inner
            if typing.get_origin(inner) in (list, List):
                (element,) = typing.get_args(inner) or (str,)
                kwargs["action"] = "append"
            value_type = spec.type or {int: int, float: finite_float, str: None, Path: Path}.get(element, UNSET)
            if value_type is UNSET:
                raise TypeError(f"{self.cls.__name__}.{f.name}: cannot make an option of type {annotation!r}; "
                                "give it a Flag(type=...) or skip it")
            if value_type is not None:
                kwargs["type"] = value_type
            kwargs["default"] = default
            if spec.choices is not None:
                kwargs["choices"] = tuple(spec.choices)
            if spec.metavar is not None or spec.choices is None:  # named after the option, not the field
                kwargs["metavar"] = spec.metavar or flag.lstrip("-").replace("-", "_").upper()
            if spec.required:
                kwargs.update(required=True)
                kwargs.pop("default")
        return {"flag": flag, "kwargs": kwargs, "to_field": spec.to_field}

    def add_to(self, parser, only: Optional[Iterable[str]] = None) -> None:
        """Add the options (of the fields in ``only``, in that order; default: every field not
        skipped, in declaration order) to ``parser`` or an argument group of it."""
        for name in (self._specs if only is None else only):
            if name not in self._specs:
                raise TypeError(f"{self.cls.__name__}.{name} is skipped or not a field")
            parser.add_argument(self._specs[name]["flag"], **self._specs[name]["kwargs"])

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """field name -> value, for every exposed field (converted back to the field's units)."""
        out = {}
        for name, spec in self._specs.items():
            if not hasattr(args, name):
                raise TypeError(f"{self.cls.__name__}.{name} ({spec['flag']}) was never added to the parser")
            value = getattr(args, name)
            if isinstance(value, list):  # a repeatable option left out is the parser's own default list
                value = list(value)
            out[name] = spec["to_field"](value) if spec["to_field"] and value is not None else value
        return out

    def build(self, args: argparse.Namespace, **overrides):
        """The dataclass from the parsed options; ``overrides`` replace (or add) field values."""
        return self.cls(**{**self.values(args), **overrides})
