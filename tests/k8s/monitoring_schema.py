"""A minimal, strict schema of the Prometheus Operator objects used here (monitoring.coreos.com/v1
PodMonitor and PrometheusRule). The operator's CRD schemas are not vendored: this covers only the
fields the manifests use (unknown fields are refused, as `kubectl apply --validate=strict` does),
not every constraint the CRDs carry."""
from __future__ import annotations

from typing import Any

_STR = {"type": "string", "minLength": 1}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS}}
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _LABELS,
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"],
        "properties": {"key": _STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": {"type": "array", "items": {"type": "string"}}}}}}}


def _object(kind: str, spec: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                           "metadata": _METADATA, "spec": spec}}


SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": _object("PodMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "selector": _SELECTOR,
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port"],
                "properties": {"port": _STR, "path": _STR, "interval": _DURATION,
                               "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}}}}}}),
    "PrometheusRule": _object("PrometheusRule", {
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {"name": _STR, "interval": _DURATION, "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["alert", "expr"],
                "properties": {"alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                               "expr": _STR, "for": _DURATION, "labels": _LABELS,
                               "annotations": _LABELS}}}}}}}}),
}


def validate(obj: dict) -> None:
    """Raise AssertionError naming the object and field when `obj` does not fit its schema."""
    import jsonschema

    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    schema = SCHEMAS.get(obj.get("kind", ""))
    assert schema is not None, f"{name}: no schema for monitoring.coreos.com kind {obj.get('kind')}"
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise AssertionError(f"{name}: {'.'.join(map(str, e.path)) or '(top)'}: {e.message}")
