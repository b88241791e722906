"""Thirty JSON schemas for the structured-output suite: nested objects, arrays, enums, bounded numbers, optional fields.

Strings and arrays are bounded so that every output fits a small max_tokens, whatever the sampler draws.
"""

from typing import Any


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, "additionalProperties": False}


NAME = {"type": "string", "maxLength": 12}
WORD = {"type": "string", "maxLength": 8}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCORE = {"type": "number", "minimum": 0, "maximum": 1}
TAGS = {"type": "array", "items": WORD, "maxItems": 3}

SCHEMAS: list[dict[str, Any]] = [
    _obj({"name": NAME}),
    _obj({"name": NAME, "age": AGE}),
    _obj({"name": NAME, "age": AGE}, required=["name"]),
    _obj({"score": SCORE}),
    _obj({"temperature": {"type": "number", "minimum": -50, "maximum": 60}}),
    _obj({"count": {"type": "integer", "minimum": 1, "maximum": 9}}),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"size": {"enum": ["S", "M", "L", "XL"]}, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}),
    _obj({"tags": TAGS}),
    _obj({"tags": {**TAGS, "minItems": 1}}),
    _obj({"numbers": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}}),
    _obj({"person": _obj({"name": NAME, "age": AGE})}),
    _obj({"person": _obj({"name": NAME, "email": {"type": "string", "maxLength": 16}}, required=["name"])}),
    _obj({"a": _obj({"b": _obj({"c": {"type": "integer", "minimum": 0, "maximum": 100}})})}),
    _obj({"items": {"type": "array", "items": _obj({"sku": WORD, "qty": {"type": "integer", "minimum": 1,
                                                                        "maximum": 9}}), "maxItems": 2}}),
    _obj({"point": _obj({"x": {"type": "integer", "minimum": -10, "maximum": 10},
                         "y": {"type": "integer", "minimum": -10, "maximum": 10}})}),
    _obj({"status": {"enum": ["open", "closed"]}, "priority": {"enum": [1, 2, 3]}}),
    _obj({"title": NAME, "done": {"type": "boolean"}, "tags": TAGS}, required=["title", "done"]),
    _obj({"city": NAME, "country": {"type": "string", "maxLength": 2, "minLength": 2}}),
    _obj({"id": {"type": "integer", "minimum": 1000, "maximum": 9999}, "label": WORD}),
    _obj({"ratio": {"type": "number", "minimum": 0.5, "maximum": 2.0}}),
    _obj({"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}, "maxItems": 2},
                     "maxItems": 2}}),
    _obj({"note": {"anyOf": [WORD, {"type": "null"}]}}),
    _obj({"kind": {"const": "event"}, "day": {"type": "integer", "minimum": 1, "maximum": 31}}),
    _obj({"first": NAME, "last": NAME, "middle": NAME}, required=["first", "last"]),
    _obj({"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}),
    _obj({"owner": _obj({"name": NAME, "pets": {"type": "array", "items": _obj({"kind": {"enum": ["cat", "dog"]},
                                                                                "age": AGE}), "maxItems": 2}})}),
    _obj({"price": {"type": "number", "minimum": 0, "maximum": 1000}, "currency": {"enum": ["USD", "EUR"]}}),
    _obj({"answer": {"enum": ["yes", "no", "maybe"]}, "confidence": SCORE}, required=["answer"]),
]
