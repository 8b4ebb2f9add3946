"""The value types of kdray's config and its error messages: strict numbers (no bool where a number is expected, no
float where an int is), 64-bit ints, finite floats, lists as tuples, names checked against the registries, and
pydantic's validation errors turned into one :class:`~kdray.errors.ConfigError` naming the dotted key."""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, AllowInfNan, BeforeValidator, Strict, ValidationError
from pydantic_core import PydanticCustomError

from kdray.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# Value types: strict (no bool where a number is expected, no float where an int is), 64-bit ints, finite floats,
# lists as tuples, names from the registries. Each rule's message is the tail of "<key>: <value> ...".


def short(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a YAML file may hold a 400-digit number)."""
    text = repr(list(value) if isinstance(value, tuple) else value)  # the list the user wrote, not our tuple
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def rule(ok: Callable[[Any], bool], phrase: str) -> AfterValidator:
    """A check on the typed value; failing it reads ``<key>: <value> <phrase>``."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError("kdray", "{value} " + phrase, {"value": short(value)})
        return value
    return AfterValidator(check)


def list_of(n: int | None = None, single: bool = False) -> BeforeValidator:
    """A YAML list (or a tuple) of ``n`` values, or of any length; pydantic then types each value. With ``single``, one
    value that is not a list stands for a list of one (``study.teacher=RUN/teacher``), and "" for none (what configs
    wrote before such a key became a list)."""
    def check(value: Any) -> Any:
        if single and not isinstance(value, (list, tuple)):
            value = [] if value == "" else [value]
        if not isinstance(value, (list, tuple)):
            raise PydanticCustomError("kdray", "expected a list, got {value}", {"value": short(value)})
        if n is not None and len(value) != n:
            raise PydanticCustomError("kdray", "expected a list of {n} values, got {got}: {value}",
                                      {"n": n, "got": len(value), "value": short(value)})
        return value
    return BeforeValidator(check)


def registered(registry: str, *extra: str) -> AfterValidator:
    """A name held by ``registry`` ("module:attribute", a dict or tuple of names; several separated by spaces), or
    one of ``extra``. The registry is imported when a config is validated, not with this module: the registries
    import torch, and the CLI imports this module before Ray starts."""
    def check(name: str) -> str:
        allowed = tuple(dict.fromkeys([*extra, *(n for entry in registry.split() for n in getattr(
            importlib.import_module(entry.split(":")[0]), entry.split(":")[1]))]))
        if name not in allowed:
            raise PydanticCustomError("kdray", "{value} is not allowed; allowed values: {allowed}",
                                      {"value": short(name), "allowed": ", ".join(map(repr, allowed))})
        return name
    return AfterValidator(check)


Int = Annotated[int, Strict(), rule(lambda v: -2**63 <= v < 2**63,  # torch, numpy and Ray take 64-bit integers
                                     "is out of range; expected an integer in [-2**63, 2**63)")]
Float = Annotated[float, Strict(), AllowInfNan(False)]  # strict floats still take ints, as floats
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Positive = rule(lambda v: v > 0, "must be > 0")
NonNegative = rule(lambda v: v >= 0, "must be >= 0")
PosInt, NonNegInt, Count = Annotated[Int, Positive], Annotated[Int, NonNegative], Annotated[Int, rule(
    lambda v: v >= 1, "must be >= 1")]
PosFloat, NonNegFloat = Annotated[Float, Positive], Annotated[Float, NonNegative]
# either task's registry here; Config._keys_agree then checks the name against the registry of cfg.task
ModelName = Annotated[Str, registered("kdray.models:MODELS kdray.models.pointwise:POINTWISE_MODELS")]
DistillLoss = Annotated[Str, registered("kdray.distill.losses:DISTILL_LOSSES", "none")]  # none: the student trains alone
HardLoss = Annotated[Str, registered("kdray.train.objective:HARD_LOSSES")]
Widths = Annotated[tuple[Int, ...], list_of(), rule(lambda ws: all(w > 0 for w in ws), "must be positive widths")]

DataSource = Literal["synthetic", "ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "lightgcn", "csv", "parquet"]

# ----------------------------------------------------------------------------------------------------------------
# pydantic's errors as ConfigError: the dotted key, the bad value, what is allowed.

_TYPE_ERRORS = {
    "int_type": "expected an integer", "float_type": "expected a number", "bool_type": "expected true or false",
    "string_type": "expected a string", "finite_number": "expected a finite number",
    "dataclass_type": "expected a mapping of keys", "dict_type": "expected a mapping of keys",
}
_UNKNOWN_KEY = ("unexpected_keyword_argument", "invalid_key", "extra_forbidden")


def config_error(error: ValidationError, root: type) -> ConfigError:
    """The first problem pydantic found while building ``root`` (the whole config), in the words of a user who edits
    YAML."""
    e = error.errors()[0]
    kind, loc, value, ctx = e["type"], [str(part) for part in e["loc"] if part != "[key]"], e["input"], e.get("ctx") or {}
    key = ".".join(loc) or "config"  # list positions read data.split_ratios[2]
    key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key) if kind not in _UNKNOWN_KEY else key
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):  # a check that spans several keys
        return ctx["error"]
    if kind in _UNKNOWN_KEY:
        where = loc[:-1]
        cls = root.__pydantic_fields__[where[0]].annotation if where else root
        allowed = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        return ConfigError(f"unknown key {key}; allowed keys{' in ' + '.'.join(where) if where else ''}: {allowed}")
    if kind == "kdray":  # this module's own rules
        return ConfigError(f"{key}: {e['msg']}")
    if kind == "literal_error":
        return ConfigError(f"{key}: {short(value)} is not allowed; allowed values: {ctx['expected']}")
    if kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):  # past the float range
        kind = "finite_number"
    return ConfigError(f"{key}: {_TYPE_ERRORS.get(kind, e['msg'])}, got {short(value)}")
