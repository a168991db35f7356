"""The files users write (sweeps, dataset cards): one strict YAML reader and one way of turning a pydantic error
into one line, shared by every schema here.

- :func:`read_yaml`: UTF-8 only, a key given twice is an error, bounded nesting; errors name the file and line;
- :class:`Strict`: the base of every schema (unknown keys are errors; YAML's ``yes`` is not an int);
- :func:`one_line`: a ``ValidationError`` as ``where: key.path: what is wrong (got value)``, with the valid keys
  when a key is unknown.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from bench.cli import ECHO_LIMIT, clip, cut


class Strict(BaseModel):
    """Unknown keys are errors; values are strictly typed (``yes`` is not an int, "3" is not a number; ints still
    count as floats)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (not "last one wins")."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:  # unhashable key: let the base loader give its own error
                break
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {clip(key)} (a key may appear once per mapping)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str, error: type[Exception], shown: str | None = None) -> Any:
    """Parse one YAML file strictly: UTF-8 only, no duplicate keys, bounded nesting. Every problem raises
    ``error`` with one line naming the file (as ``shown``, default the path) and the line where YAML knows it;
    ``what`` names the kind of file in the advice ("save the sweep as UTF-8")."""
    name = shown or str(path)
    if path.is_dir():
        raise error(f"{name}: is a directory; give a {what} YAML file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{name}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                    f"save the {what} as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{name}:{where} invalid YAML: {cut(str(getattr(e, 'problem', None) or e))}") from None
    except RecursionError:
        raise error(f"{name}: YAML nested too deeply to read; a {what} is a few levels deep") from None


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` under ``root`` (for listing its valid keys)."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        cands = [ann, *typing.get_args(ann)]
        cands += [a for c in list(cands) for a in typing.get_args(c)]
        nxt = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def one_line(err: ValidationError, where: str, root: type[BaseModel] | None = None, prefix: str = "",
             unknown: str = "unknown key") -> str:
    """One line for a pydantic error: ``where: prefix.loc: message``, the offending value clipped (``(got ...)``;
    not for a missing key or a message that already says it), the valid keys of the model holding an unknown key
    (``unknown`` words it, e.g. "unknown key for mend"), and how many more errors there are."""
    errors = err.errors()
    e = errors[0]
    loc = ".".join(x for x in (prefix, ".".join(str(p) for p in e["loc"])) if x) or "(top level)"
    more = f" ({len(errors) - 1} more)" if len(errors) > 1 else ""
    head = f"{where}: {cut(loc)}" if where else cut(loc)
    if e["type"] == "extra_forbidden":
        holder = model_at(root, tuple(e["loc"])) if root is not None else None
        valid = f"; valid: {', '.join(holder.model_fields)}" if holder is not None else ""
        return f"{head}: {unknown}{valid}{more}"
    got = ""
    if "input" in e and e["type"] not in ("missing", "value_error") and not isinstance(e["input"], dict):
        got = f" (got {clip(e['input'])})"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{head}: {cut(msg, 2 * ECHO_LIMIT)}{got}{more}"
