"""Config rules as data: `check_table(cfg, [(key, rule), ...])` raises ConfigError for the first bad value.

A rule is a function `(value, key) -> None` that raises `ConfigError("invalid KEY=VALUE: ...")`,
saying what is allowed. `mlbreg.config.validate` and each method's `rules` (mlbreg.methods)
are tables of them. A leaf module: it imports nothing of mlbreg.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import OmegaConf

Rule = Callable[[Any, str], None]


class ConfigError(ValueError):
    """An invalid configuration value (raised before anything runs)."""


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid {key}={value!r}: {allowed}")


def number(value: Any, key: str) -> float:
    """`value` as a finite number, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(key, value, "must be a number")
    if not math.isfinite(value):
        fail(key, value, "must be a finite number")
    return value


def integer(low: int, meaning: str = "") -> Rule:
    def rule(value, key):
        if int(number(value, key)) != value or value < low:
            fail(key, value, f"must be an integer >= {low}{meaning}")

    return rule


def at_least(low: float, meaning: str = "") -> Rule:
    def rule(value, key):
        if number(value, key) < low:
            fail(key, value, f"must be >= {low:g}{meaning}")

    return rule


def above(low: float, meaning: str = "") -> Rule:
    def rule(value, key):
        if number(value, key) <= low:
            fail(key, value, f"must be > {low:g}{meaning}")

    return rule


def interval(low: float, high: float, brackets: str = "[]", meaning: str = "") -> Rule:
    """`brackets`: "[]", "[)", "(]" or "()" as in the message "must be in [0, 1)"."""

    def rule(value, key):
        v = number(value, key)
        ok_low = v >= low if brackets[0] == "[" else v > low
        ok_high = v <= high if brackets[1] == "]" else v < high
        if not (ok_low and ok_high):
            fail(key, value, f"must be in {brackets[0]}{low:g}, {high:g}{brackets[1]}{meaning}")

    return rule


def choice(valid: Iterable[Any]) -> Rule:
    valid = tuple(valid)

    def rule(value, key):
        if value not in valid:
            fail(key, value, f"valid: {', '.join(str(v).lower() if isinstance(v, bool) else str(v) for v in valid)}")

    return rule


def boolean(value, key) -> None:
    if not isinstance(value, bool):
        fail(key, value, "must be true or false")


def optional(rule: Rule, meaning: str = "") -> Rule:
    """null is allowed; anything else must pass `rule` (its message gets `meaning` appended)."""

    def check(value, key):
        if value is None:
            return
        try:
            rule(value, key)
        except ConfigError as err:
            raise ConfigError(f"{err}{meaning}") from None

    return check


def check_table(cfg, table: Iterable[tuple[str, Rule]]) -> None:
    """Apply each rule to its dotted key; keys the config does not have are skipped (a
    method group without `delta`, say)."""
    for key, rule in table:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is None or leaf not in node:
            continue
        rule(OmegaConf.select(cfg, key), key)
