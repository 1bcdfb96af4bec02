"""Activities to and from JSON without msrest's generic walk: msrest's result at a fraction of the CPU.

botbuilder-schema's models are msrest models, and msrest (de)serialises them by visiting every
attribute of every model through several layers of generic dispatch: about 150 µs to read one chat
message and 300 µs to write one reply, more than the rest of a turn in this app. The schema's
models are plain (no flattened keys, subtypes, read-only, constant or enum-typed attributes; each
class is checked when its plan is built), so a per-class plan of (attribute, JSON key, type) does
the same work directly.

Exactly msrest's result, by construction: what a plan does not cover (timestamps, ``object``
fields, bytes, dictionaries, a value whose type is not the declared one) goes to msrest's own
converter for that one value, and anything unexpected about a model (a class that is not plain, an
error) sends the whole activity through msrest, whose output and errors are then the answer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from botbuilder.schema import Activity
from msrest.serialization import Deserializer, Model, Serializer

# The dependencies msrest itself uses for these models (Model.serialize / Model.deserialize).
_SCHEMA: dict[str, type] = Activity._infer_class_models()
_MODELS: dict[str, type[Model]] = {
    name: cls for name, cls in _SCHEMA.items() if isinstance(cls, type) and issubclass(cls, Model)
}
_BASIC: dict[str, type] = {"str": str, "bool": bool, "int": int, "float": float}
_serializer = Serializer(_SCHEMA)
_deserializer = Deserializer(_SCHEMA)


@dataclass(frozen=True)
class _Plan:
    """How one plain model class maps to JSON, both ways."""

    entries: tuple[tuple[str, str, str, dict], ...]  # (attribute, JSON key, msrest type, description)
    by_key: dict[str, tuple[str, str]]  # JSON key -> (attribute, msrest type)


_plans: dict[type, _Plan | None] = {}  # None: not plain


class _NotPlain(Exception):
    """A model this module does not cover: msrest handles the whole activity."""


def _plan(cls: type) -> _Plan:
    if cls not in _plans:
        _plans[cls] = _build_plan(cls)
    plan = _plans[cls]
    if plan is None:
        raise _NotPlain(cls.__name__)
    return plan


def _build_plan(cls: type) -> _Plan | None:
    if not (
        issubclass(cls, Model)
        and not getattr(cls, "_validation", None)
        and not getattr(cls, "_subtype_map", None)
        and not cls.is_xml_model()
    ):
        return None
    entries = []
    for attr, desc in cls._attribute_map.items():
        key = desc["key"]
        if attr == "additional_properties" or not key or "." in key or "\\" in key:
            return None
        entries.append((attr, key, desc["type"], desc))
    by_key = {key: (attr, type_) for attr, key, type_, _ in entries}
    # Reading sets only the attributes present in the JSON; msrest passes None for the others,
    # which is the same only where every constructor default is None.
    if len(by_key) != len(entries) or not _defaults_are_none(cls):
        return None
    return _Plan(tuple(entries), by_key)


def _defaults_are_none(cls: type) -> bool:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return all(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is None for p in parameters)


# -- JSON -> models -----------------------------------------------------------------------------
def activity_from_json(data: dict[str, Any]) -> Activity:
    """``Activity().deserialize(data)``, for JSON-decoded ``data``."""
    try:
        return _model_from_json(Activity, data)
    except Exception:  # msrest decides, and raises its own DeserializationError if it must
        return Activity().deserialize(data)


def _model_from_json(cls: type, data: Any) -> Any:
    if type(data) is not dict:
        raise _NotPlain(cls.__name__)
    fields = _plan(cls).by_key
    attrs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, raw in data.items():  # only what the message holds, not all ~45 attributes
        field = fields.get(key)
        if field is None:
            extra[key] = raw
        else:
            attrs[field[0]] = _from_json(raw, field[1])
    model = cls(**attrs)
    if extra:  # msrest keeps keys the schema does not know (Teams' mention "text", ...)
        model.additional_properties = extra
    return model


def _from_json(raw: Any, type_: str) -> Any:
    if raw is None:
        return None
    basic = _BASIC.get(type_)
    if basic is not None:
        if type(raw) is basic:
            return raw
    elif type_[0] == "[" and type(raw) is list:
        inner = type_[1:-1]
        return [_from_json(item, inner) for item in raw]
    elif type(raw) is dict and type_ in _MODELS:
        return _model_from_json(_MODELS[type_], raw)
    return _deserializer.deserialize_data(raw, type_)


# -- models -> JSON -----------------------------------------------------------------------------
def model_to_json(model: Model) -> dict[str, Any]:
    """``model.serialize()`` for a botbuilder-schema model (an activity, ``ExpectedReplies``, ...)."""
    try:
        return _model_to_json(model)
    except Exception:  # msrest decides, and raises its own SerializationError if it must
        return model.serialize()


def _model_to_json(model: Model) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, key, type_, desc in _plan(type(model)).entries:
        value = getattr(model, attr)
        if value is not None:  # msrest leaves out unset attributes
            out[key] = _to_json(value, type_, desc)
    return out


def _to_json(value: Any, type_: str, desc: dict) -> Any:
    basic = _BASIC.get(type_)
    if basic is not None:
        if type(value) is basic:
            return value
    elif type_[0] == "[" and type(value) is list:
        inner = type_[1:-1]
        return [None if item is None else _to_json(item, inner, desc) for item in value]
    elif type_ in _MODELS and isinstance(value, Model):
        return _model_to_json(value)
    return _serializer.serialize_data(
        value, type_, keep_readonly=False, is_xml=False, serialization_ctxt=desc
    )
