"""Check FineTuneJob objects against the CRD the way the API server does, without a cluster.

The API server defaults an object, checks it against the OpenAPI schema, then evaluates every
``x-kubernetes-validations`` CEL rule at the node it is declared on (transition rules, the ones that
mention ``oldSelf``, only on updates where the old object has that node). This module does the same with
``jsonschema`` and ``celpy``:

- ``apply_defaults`` fills ``default:`` values top-down, so ``default: {}`` on an object pulls in its
  children's defaults, as structural defaulting does.
- ``to_jsonschema`` turns the OpenAPI v3.0 schema into Draft 4 JSON Schema (boolean
  ``exclusiveMinimum``), maps ``x-kubernetes-int-or-string`` to integer-or-string and closes every object
  with ``properties`` (``additionalProperties: false``), the way ``kubectl`` strict field validation
  rejects unknown fields.
- ``evaluate_rules`` converts values by their schema type before handing them to CEL: a ``number`` field
  is a CEL double even when written as ``1``, as in Kubernetes, so ``self == oldSelf`` compares like the
  API server does.

The CEL rules use only standard CEL (``has``, ``size``, ``matches``, ``endsWith``), so no Kubernetes
extension library has to be emulated. Their regular expressions stay in the subset RE2 and Python's
``re`` read alike.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / "kubetune.io_finetunejobs.yaml"
EXAMPLES_DIR = REPO_ROOT / "examples"

_MISSING = object()


@functools.cache
def load_crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return crd


def version_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the one served version (a fresh copy)."""
    (version,) = load_crd()["spec"]["versions"]
    return copy.deepcopy(version["schema"]["openAPIV3Schema"])


@dataclass(frozen=True)
class SchemaNode:
    path: str  # "spec.trainer.env[]"; "" is the root
    schema: dict[str, Any]


def walk_schema(schema: dict[str, Any], path: str = "") -> Iterator[SchemaNode]:
    """Every schema node, depth first, with a path in the API's own notation."""
    yield SchemaNode(path, schema)
    for name, child in schema.get("properties", {}).items():
        yield from walk_schema(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk_schema(schema["additionalProperties"], f"{path}[*]")
    if "items" in schema:
        yield from walk_schema(schema["items"], f"{path}[]")


@dataclass(frozen=True)
class Rule:
    path: str  # schema path of the node the rule is declared on
    rule: str
    message: str

    @property
    def is_transition(self) -> bool:
        return "oldSelf" in self.rule


def all_rules(schema: dict[str, Any] | None = None) -> list[Rule]:
    nodes = walk_schema(schema if schema is not None else version_schema())
    return [
        Rule(node.path, item["rule"], item.get("message", ""))
        for node in nodes
        for item in node.schema.get("x-kubernetes-validations", [])
    ]


# --- defaulting ---------------------------------------------------------------------------------------------


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Return a copy of ``value`` with the schema's defaults filled in, top-down."""
    value = copy.deepcopy(value)
    _default_in_place(schema, value)
    return value


def _default_in_place(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                _default_in_place(child, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for item in value.values():
                _default_in_place(extra, item)
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _default_in_place(schema["items"], item)


# --- OpenAPI schema checks ----------------------------------------------------------------------------------


def to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: to_jsonschema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_jsonschema(value)
        elif key == "x-kubernetes-list-type" and value == "set":
            out["uniqueItems"] = True
        elif not key.startswith("x-kubernetes-"):
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        string_rules = {k: out.pop(k) for k in ("pattern", "maxLength", "minLength") if k in out}
        out["anyOf"] = [{"type": "integer"}, {"type": "string", **string_rules}]
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def schema_error_field(error: jsonschema.ValidationError) -> str:
    """The field an error is about, in the API server's notation (spec.trainer.env[0].name)."""
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if error.validator == "required":
        # jsonschema reports one error per missing property, naming it first in the message.
        missing = error.message.split("'")[1]
        path = f"{path}.{missing}" if path else missing
    return path


def list_map_errors(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Duplicate keys in ``x-kubernetes-list-type: map`` lists, which the API server rejects."""
    errors: list[str] = []
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name in value:
                errors += list_map_errors(child, value[name], f"{path}.{name}" if path else name)
    elif isinstance(value, list) and "items" in schema:
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            seen: set[tuple[Any, ...]] = set()
            for index, item in enumerate(value):
                key = tuple(item.get(k) for k in keys)
                if key in seen:
                    errors.append(f"{path}[{index}]: Duplicate value: {dict(zip(keys, key, strict=True))}")
                seen.add(key)
        for index, item in enumerate(value):
            errors += list_map_errors(schema["items"], item, f"{path}[{index}]")
    return errors


# --- CEL ----------------------------------------------------------------------------------------------------

_CEL_ENV = celpy.Environment()


@functools.cache
def _program(rule: str) -> celpy.Runner:
    return _CEL_ENV.program(_CEL_ENV.compile(rule))


def to_cel(schema: dict[str, Any], value: Any) -> Any:
    """Convert JSON to CEL values typed by the schema, as the API server does."""
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        if properties is None and not isinstance(extra, dict):
            return celpy.json_to_cel(value)  # free-form (metadata, x-kubernetes-preserve-unknown-fields)
        return celtypes.MapType(
            {
                celtypes.StringType(name): to_cel(
                    properties.get(name, {}) if properties is not None else extra, item
                )
                for name, item in value.items()
            }
        )
    if kind == "array":
        return celtypes.ListType([to_cel(schema["items"], item) for item in value])
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "string":
        return celtypes.StringType(value)
    return celpy.json_to_cel(value)


@dataclass(frozen=True)
class Violation:
    field: str  # where the API server reports it: "spec.hyperparameters", "" for the root
    rule: Rule
    detail: str = ""  # set when the rule could not be evaluated at all

    @property
    def message(self) -> str:
        return self.rule.message if not self.detail else f"{self.rule.message} ({self.detail})"


@dataclass
class RuleLog:
    """Which rules were evaluated and how they came out, for coverage checks."""

    passed: set[Rule] = field(default_factory=set)
    failed: set[Rule] = field(default_factory=set)


def evaluate_rules(
    schema: dict[str, Any], value: Any, old: Any = _MISSING, log: RuleLog | None = None
) -> list[Violation]:
    violations: list[Violation] = []
    _evaluate(schema, value, old, "", "", violations, log)
    return violations


def _evaluate(
    schema: dict[str, Any],
    value: Any,
    old: Any,
    field_path: str,
    schema_path: str,
    out: list[Violation],
    log: RuleLog | None,
) -> None:
    for item in schema.get("x-kubernetes-validations", []):
        rule = Rule(schema_path, item["rule"], item.get("message", ""))
        if rule.is_transition and old is _MISSING:
            continue
        activation = {"self": to_cel(schema, value)}
        if rule.is_transition:
            activation["oldSelf"] = to_cel(schema, old)
        try:
            result = _program(rule.rule).evaluate(activation)
        except celpy.CELEvalError as error:
            out.append(Violation(field_path, rule, f"evaluation error: {error}"))
            continue
        if isinstance(result, celpy.CELEvalError) or not isinstance(result, celtypes.BoolType):
            out.append(Violation(field_path, rule, f"evaluation error: {result!r}"))
        elif result:
            if log is not None:
                log.passed.add(rule)
        else:
            out.append(Violation(field_path, rule))
            if log is not None:
                log.failed.add(rule)

    def join(name: str) -> str:
        return f"{field_path}.{name}" if field_path else name

    def join_schema(name: str) -> str:
        return f"{schema_path}.{name}" if schema_path else name

    if isinstance(value, dict):
        old_map = old if isinstance(old, dict) else {}
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if properties is not None and name in properties:
                child, child_schema_path = properties[name], join_schema(name)
            elif isinstance(extra, dict):
                child, child_schema_path = extra, f"{schema_path}[*]"
            else:
                continue
            _evaluate(child, item, old_map.get(name, _MISSING), join(name), child_schema_path, out, log)
    elif isinstance(value, list) and "items" in schema:
        keys = schema.get("x-kubernetes-list-map-keys")
        old_items: dict[tuple[Any, ...], Any] = {}
        if keys and isinstance(old, list):
            old_items = {tuple(entry.get(k) for k in keys): entry for entry in old}
        for index, item in enumerate(value):
            # Only list-map entries correlate with an old entry (by key); other list items never do.
            old_item = old_items.get(tuple(item.get(k) for k in keys), _MISSING) if keys else _MISSING
            _evaluate(schema["items"], item, old_item, f"{field_path}[{index}]", f"{schema_path}[]", out, log)


# --- the whole check ----------------------------------------------------------------------------------------


@dataclass
class Verdict:
    schema_errors: list[jsonschema.ValidationError]
    list_errors: list[str]
    violations: list[Violation]

    @property
    def ok(self) -> bool:
        return not (self.schema_errors or self.list_errors or self.violations)

    def messages(self) -> list[str]:
        return (
            [f"{schema_error_field(e)}: {e.message}" for e in self.schema_errors]
            + self.list_errors
            + [f"{v.field}: {v.message}" for v in self.violations]
        )


@functools.cache
def _validator() -> jsonschema.Draft4Validator:
    translated = to_jsonschema(version_schema())
    jsonschema.Draft4Validator.check_schema(translated)
    return jsonschema.Draft4Validator(translated)


def check(obj: dict[str, Any], old: dict[str, Any] | None = None, log: RuleLog | None = None) -> Verdict:
    """Default ``obj`` (and ``old``), validate it against the schema and, where it is well-typed,
    evaluate the CEL rules; transition rules run only when ``old`` is given (an update)."""
    schema = version_schema()
    new = apply_defaults(schema, obj)
    schema_errors = sorted(_validator().iter_errors(new), key=lambda e: list(e.absolute_path))
    list_errors = list_map_errors(schema, new)
    if schema_errors:
        return Verdict(schema_errors, list_errors, [])
    previous = apply_defaults(schema, old) if old is not None else _MISSING
    return Verdict(schema_errors, list_errors, evaluate_rules(schema, new, previous, log))


def load_examples() -> dict[str, list[dict[str, Any]]]:
    """Every document of every examples/*.yaml, by file name."""
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        for path in sorted(EXAMPLES_DIR.glob("*.yaml"))
    }
