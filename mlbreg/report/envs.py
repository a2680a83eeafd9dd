"""The env.json fields that differ between the included runs (`mlbreg.env.COMPARED_FIELDS`),
as lines for report.md and the terminal."""

from __future__ import annotations

import json
from typing import Any

from ..env import COMPARED_FIELDS, differing
from .collect import Collection


def _env_value(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if key == "git_commit":
        return str(value)[:10]
    if key == "git_dirty":
        return "dirty" if value else "clean"
    return str(value)


def _runs_phrase(names: list[str], named: bool = True, show: int = 5) -> str:
    """ "5 runs" or "1 run: name"; beyond `show` names the rest is counted, not listed."""
    count = f"{len(names)} run{'s' if len(names) != 1 else ''}"
    if not named:
        return count
    listed = ", ".join(names[:show]) + (f", and {len(names) - show} more" if len(names) > show else "")
    return f"{count}: {listed}"


def environment_notes(collection: Collection) -> list[str]:
    """One line per compared env.json field (`mlbreg.env.COMPARED_FIELDS`) whose value is not
    the same in every included run, the values by how many runs have them; a line for included
    runs without env.json and one per run resumed under another environment. [] when all agree."""

    runs = collection.runs
    ok = runs[runs["included"].astype(bool)]
    envs = {row.run: collection.envs.get(row.path) for row in ok.itertuples()}
    present = {name: env for name, env in envs.items() if env is not None}
    lines = []
    for key, values in differing(present).items():
        ordered = sorted(values.items(), key=lambda item: (-len(item[1]), _env_value(key, item[0])))
        # the runs that stand out are named; the most common value is only counted
        lines.append(
            f"environments differ: {key} "
            + " vs ".join(
                f"{_env_value(key, value)} ({_runs_phrase(sorted(names), named=i > 0)})"
                for i, (value, names) in enumerate(ordered)
            )
        )
    missing = sorted(name for name, env in envs.items() if env is None)
    if missing:
        lines.append(f"no env.json: {_runs_phrase(missing)} (not compared)")
    for name, env in present.items():
        attempts = [e for e in env.get("earlier") or [] if isinstance(e, dict)] + [env]
        changed = [k for k in COMPARED_FIELDS if len({json.dumps(e.get(k), default=str) for e in attempts}) > 1]
        if len(attempts) > 1 and changed:
            lines.append(
                f"resumed under another environment: {name} ("
                + ", ".join(f"{k} {' -> '.join(_env_value(k, e.get(k)) for e in attempts)}" for k in changed)
                + ")"
            )
    return lines
