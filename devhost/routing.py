"""ASP.NET-style route templates, as the Functions host matches HTTP trigger routes.

Supported: literal segments, ``{name}``, optional ``{name?}``, constrained ``{name:int}``,
``{name:alpha}`` (and the other common inline constraints), and a trailing catch-all ``{*rest}``.
Matching is case-insensitive on literals, like ASP.NET routing.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote

_PARAM = re.compile(r"^\{(?P<star>\*{1,2})?(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}$")


class RouteTemplateError(ValueError):
    """A route template that the host cannot serve."""


def _is_int(v: str) -> bool:
    return re.fullmatch(r"-?\d+", v) is not None


def _is_bool(v: str) -> bool:
    return v.lower() in ("true", "false")


def _is_guid(v: str) -> bool:
    try:
        uuid.UUID(v)
    except ValueError:
        return False
    return True


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


_SIMPLE_CONSTRAINTS = {
    "int": _is_int,
    "long": _is_int,
    "alpha": lambda v: re.fullmatch(r"[A-Za-z]+", v) is not None,
    "bool": _is_bool,
    "guid": _is_guid,
    "float": _is_number,
    "double": _is_number,
    "decimal": _is_number,
}


def _constraint(spec: str, template: str):
    """Build a predicate from one inline constraint such as ``int`` or ``minlength(3)``."""
    m = re.fullmatch(r"(?P<kind>[a-z]+)(?:\((?P<arg>.*)\))?", spec)
    if not m:
        raise RouteTemplateError(f"route '{template}': cannot parse constraint ':{spec}'")
    kind, arg = m["kind"], m["arg"]
    if arg is None and kind in _SIMPLE_CONSTRAINTS:
        return _SIMPLE_CONSTRAINTS[kind]
    if arg is not None:
        if kind == "regex":
            rx = re.compile(arg)
            return lambda v: rx.fullmatch(v) is not None
        if kind in ("minlength", "maxlength", "length", "min", "max"):
            n = int(arg.split(",")[0])
            return {
                "minlength": lambda v: len(v) >= n,
                "maxlength": lambda v: len(v) <= n,
                "length": lambda v: len(v) == n,
                "min": lambda v: _is_int(v) and int(v) >= n,
                "max": lambda v: _is_int(v) and int(v) <= n,
            }[kind]
        if kind == "range":
            lo, hi = (int(x) for x in arg.split(","))
            return lambda v: _is_int(v) and lo <= int(v) <= hi
    raise RouteTemplateError(f"route '{template}': unsupported constraint ':{spec}'")


@dataclass(frozen=True)
class _Segment:
    literal: str | None = None
    name: str | None = None
    optional: bool = False
    catch_all: bool = False
    checks: tuple = field(default=())
    constraints: tuple[str, ...] = ()  # the constraint texts, sorted: what ``shape`` compares
    default: str | None = None


@dataclass(frozen=True)
class RouteTemplate:
    """A parsed route template; ``match`` returns route params or None."""

    template: str
    segments: tuple[_Segment, ...]

    @classmethod
    def parse(cls, template: str) -> RouteTemplate:
        text = template.strip().strip("/")
        segments: list[_Segment] = []
        parts = text.split("/") if text else []
        for i, part in enumerate(parts):
            if not part:
                raise RouteTemplateError(f"route '{template}': empty segment")
            m = _PARAM.match(part)
            if not m:
                if "{" in part or "}" in part:
                    raise RouteTemplateError(
                        f"route '{template}': segment '{part}' mixes text and parameters, "
                        "which this host does not support"
                    )
                segments.append(_Segment(literal=part.lower()))
                continue
            segments.append(cls._param_segment(m, template, is_last=i == len(parts) - 1))
        names = [s.name for s in segments if s.name]
        if len(names) != len(set(n.lower() for n in names)):
            raise RouteTemplateError(f"route '{template}': a parameter name is used twice")
        seen_optional = False
        for s in segments:
            if s.optional or s.catch_all:
                seen_optional = True
            elif seen_optional:
                raise RouteTemplateError(
                    f"route '{template}': an optional parameter must be followed only by optional ones"
                )
        return cls(template=template, segments=tuple(segments))

    @staticmethod
    def _param_segment(m: re.Match, template: str, *, is_last: bool) -> _Segment:
        name, rest, star = m["name"], m["rest"], bool(m["star"])
        optional = rest.endswith("?")
        if optional:
            rest = rest[:-1]
        default = None
        if "=" in rest:
            rest, default = rest.split("=", 1)
            optional = True
        constraints = tuple(rest.split(":")[1:]) if rest else ()
        checks = tuple(_constraint(c, template) for c in constraints)
        if rest and not rest.startswith(":"):
            raise RouteTemplateError(f"route '{template}': cannot parse parameter '{m.group(0)}'")
        if star and not is_last:
            raise RouteTemplateError(f"route '{template}': a catch-all parameter must be the last segment")
        return _Segment(
            name=name,
            optional=optional,
            catch_all=star,
            checks=checks,
            constraints=tuple(sorted(constraints)),
            default=default,
        )

    @property
    def specificity(self) -> tuple:
        """Sort key: more literal segments first, catch-alls last (as ASP.NET orders routes)."""
        literals = sum(1 for s in self.segments if s.literal is not None)
        constrained = sum(1 for s in self.segments if s.checks)
        catch_all = any(s.catch_all for s in self.segments)
        return (catch_all, -literals, -constrained, -len(self.segments))

    def shape(self) -> tuple:
        """Two templates with the same shape match exactly the same paths (a route clash).

        Parameter names do not matter, constraints do: ``a/{x:int}`` and ``a/{y:alpha}`` never match
        the same path, so they may live side by side; ``a/{x}`` and ``a/{y}`` always do.
        """
        return tuple(
            ("lit", s.literal) if s.literal is not None else ("param", s.optional, s.catch_all, s.constraints)
            for s in self.segments
        )

    def match(self, path: str) -> dict[str, str] | None:
        parts = [p for p in path.strip("/").split("/")] if path.strip("/") else []
        params: dict[str, str] = {}
        for i, seg in enumerate(self.segments):
            if seg.catch_all:
                rest = "/".join(unquote(p) for p in parts[i:])
                if rest:
                    params[seg.name] = rest  # type: ignore[index]
                return params
            if i >= len(parts):
                if seg.optional:
                    if seg.default is not None:
                        params[seg.name] = seg.default  # type: ignore[index]
                    continue
                return None
            value = unquote(parts[i])
            if seg.literal is not None:
                if value.lower() != seg.literal:
                    return None
                continue
            if not all(check(value) for check in seg.checks):
                return None
            params[seg.name] = value  # type: ignore[index]
        if len(parts) > len(self.segments):
            return None
        return params
