"""JSON documents checked against a JSON Schema kept in the package, with one-line errors.

Shared by the image manifest (kvmpod/image/manifest.py) and the pod manifest
(kvmpod/pod/podmanifest.py). A `SchemaFile` names a schema file and the label its errors start
with; every error is one line, `<label>: <field path>: <value as JSON> <problem>`.

Schemas find each other by relative `$ref` to a file name (the pod manifest's apps use the image
manifest's `app` definition: `image-manifest.schema.json#/$defs/app`); a SchemaFile lists the
files it refers to in `uses`. jsonschema is imported only when validating, so the run path does
not pay for it when it trusts stored data.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from kvmpod.errors import ManifestError

MAX_DEPTH = 64  # the spec's manifests nest 6 deep; this bounds recursion on hostile input

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*\Z")
_MAX_SHOWN = 60  # a bad value can be up to 1 MiB; the line stays readable
_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
               "array": "a list", "object": "an object", "null": "null"}


def path(parts: Any) -> str:
    """["app", "ports", 1, "name"] -> "app.ports[1].name"; odd keys are quoted: value["net.core.x"]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def show(value: Any) -> str:
    # ASCII-only JSON: no newlines or terminal control characters from the input reach the user.
    text = json.dumps(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."


@functools.cache
def regex(pattern: str) -> re.Pattern[str]:
    # JSON Schema patterns are ECMA-262, where "$" matches only at the very end; Python's "$" also
    # matches before a final "\n", which would let "name\n" pass as an AC Name.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


@functools.cache
def _load(package: str, filename: str) -> dict[str, Any]:
    # the package's own directory (it is imported: the SchemaFile is defined in it), not
    # importlib.resources, which costs kvmpod run ~5 ms of imports before QEMU can start
    directory = os.path.dirname(sys.modules[package].__file__ or "")
    with open(os.path.join(directory, "schema", filename), encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def _validator_class() -> Any:
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import ValidationError

    def pattern(validator: Any, patrn: str, instance: Any, schema: dict) -> Any:
        if validator.is_type(instance, "string") and not regex(patrn).search(instance):
            yield ValidationError(f"{instance!r} does not match {patrn!r}")

    # The spec's integers are integers: 1.0 is not a port (Go's encoding/json refuses it too).
    types = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool))
    return validators.extend(Draft202012Validator, validators={"pattern": pattern}, type_checker=types)


@dataclass(frozen=True)
class SchemaFile:
    label: str                              # how errors name the document: "manifest", "pod manifest"
    package: str                            # the package whose schema/ directory holds the file
    filename: str
    uses: tuple["SchemaFile", ...] = ()     # the files its $refs point into

    def schema(self) -> dict[str, Any]:
        return _load(self.package, self.filename)

    def fail(self, where: str, value: Any, problem: str) -> ManifestError:
        return ManifestError(f"{self.label}: {where}: {show(value)} {problem}")

    def validate(self, obj: Any) -> None:
        # The schemas have no anyOf/oneOf, so every error already sits at the field it is about. Of
        # all errors, report the one highest up (a missing or mistyped parent before its children),
        # first in schema order among equals: deterministic, unlike best_match's heuristic.
        best = min(_validator(self).iter_errors(obj), key=lambda e: len(e.absolute_path), default=None)
        if best is not None:
            raise self.error_line(best)

    def error_line(self, error: Any) -> ManifestError:
        """One jsonschema ValidationError as kvmpod's one-line ManifestError."""
        parts = list(error.absolute_path)
        schema = error.schema if isinstance(error.schema, dict) else {}
        keyword = error.validator
        instance = error.instance
        if keyword == "required":
            missing = next(k for k in error.validator_value if k not in instance)
            return ManifestError(f"{self.label}: {path([*parts, missing])}: required field is missing")
        where = path(parts)
        if keyword == "not":  # {"not": {}}: the field must be absent
            return self.fail(where, instance, "is not allowed here")
        if keyword == "type":
            types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
            return self.fail(where, instance, "is not " + " or ".join(_TYPE_NAMES[t] for t in types))
        if "$comment" in schema:  # the subschema names what its values are, e.g. "an AC Name"
            return self.fail(where, instance, f"is not {schema['$comment']}")
        if keyword == "const":
            return self.fail(where, instance, f"is not {show(error.validator_value)}")
        if keyword == "enum":
            return self.fail(where, instance, "is not one of " + ", ".join(map(show, error.validator_value)))
        if keyword in ("minimum", "maximum"):
            low, high = schema.get("minimum"), schema.get("maximum")
            if keyword == "minimum" and low == 0:
                return self.fail(where, instance, "is not a non-negative integer")
            if low is not None and high is not None:
                return self.fail(where, instance, f"is not between {low} and {high}")
            return self.fail(where, instance, f"is less than {low}" if keyword == "minimum" else f"is more than {high}")
        if keyword == "minItems":
            return self.fail(where, instance, "is an empty list")
        if keyword == "minLength":
            return self.fail(where, instance, "is an empty string")
        return self.fail(where, instance, f"fails the schema's {keyword!r} rule")  # a keyword added later

    def read_json(self, data: bytes, max_bytes: int) -> dict[str, Any]:
        """The bytes as a JSON object: size, UTF-8, strict JSON (no NaN, no inf), nesting depth."""
        label = self.label
        if len(data) > max_bytes:
            raise ManifestError(f"{label}: {len(data)} bytes exceeds the {max_bytes}-byte limit")

        def reject_constant(name: str) -> Any:
            raise ManifestError(f"{label}: invalid JSON: {name} is not a JSON value")

        def finite_float(text: str) -> float:
            value = float(text)
            if not math.isfinite(value):  # Python reads 1e999 as inf, which no field can mean
                raise ManifestError(f"{label}: invalid JSON: number {text[:20]} is out of range")
            return value

        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=reject_constant, parse_float=finite_float)
        except UnicodeDecodeError as cause:
            raise ManifestError(f"{label}: not valid UTF-8") from cause
        except json.JSONDecodeError as e:
            raise ManifestError(f"{label}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
        except ValueError as cause:  # Python refuses integers of more than 4300 digits
            raise ManifestError(f"{label}: invalid JSON: a number has too many digits") from cause
        except RecursionError as cause:
            raise ManifestError(f"{label}: nested deeper than {MAX_DEPTH} levels") from cause
        if not isinstance(obj, dict):
            raise ManifestError(f"{label}: top level is not a JSON object")
        return obj

    def check_depth(self, obj: Any) -> None:
        if _too_deep(obj):
            raise ManifestError(f"{self.label}: nested deeper than {MAX_DEPTH} levels")

    def check_unique(self, items: list[dict[str, Any]], where: str, what: str) -> dict[str, int]:
        """Index of each item's "name"; raises on the first repeated name."""
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            name = item["name"]
            if name in seen:
                raise self.fail(f"{where}[{i}].name", name, f"is a duplicate {what} name")
            seen[name] = i
        return seen


@functools.cache
def _validator(doc: SchemaFile) -> Any:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    # every file a schema refers to, by its file name (relative $refs resolve to exactly that)
    pending, known = list(doc.uses), {}
    while pending:
        used = pending.pop()
        if used.filename not in known:
            known[used.filename] = Resource.from_contents(used.schema(), default_specification=DRAFT202012)
            pending.extend(used.uses)
    registry = Registry().with_resources(known.items())
    return _validator_class()(doc.schema(), registry=registry)


def _too_deep(obj: Any) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return False
