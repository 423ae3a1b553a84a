"""The OpenAPI document, made to say what the API really accepts and answers.

FastAPI derives most of it from the routes; this adds what it cannot know:

- every error is ``application/problem+json`` shaped as ``Problem`` (FastAPI
  documents its own validation-error body, which this API never sends);
- every operation lists the errors the middleware and body parsing can give it
  (400 for a body that is not JSON, 413 over the size limit, 422, 431 for
  oversized headers, and 429 with ``Retry-After`` where a request budget applies);
- a header or query parameter is never ``null`` (a client cannot send one);
- a job request's payload is the schema of its task's payload model, one
  variant per registered task, so a client (or a fuzzer) can tell a valid
  submission without trying it;
- event streams are ``text/event-stream`` whose events carry an ``Event`` as
  JSON ``data``, described with ``contentMediaType`` and ``contentSchema``.

Rules JSON Schema cannot state (``backoff_base`` at most ``backoff_cap``; an
idempotency key reused with another body) are in the field descriptions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel

from conveyor.api.problems import PROBLEM_JSON, Problem
from conveyor.api.ratelimit import UNLIMITED_PATHS
from conveyor.jobs import Event, EventType
from conveyor.pipelines import PipelineEvent

if TYPE_CHECKING:
    from conveyor.app import Conveyor

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"
EVENT_STREAM = "text/event-stream"
#: FastAPI's own validation error bodies; this API answers with ``Problem`` instead.
FASTAPI_ERROR_MODELS = ("HTTPValidationError", "ValidationError")
_COMPONENT_NAME = re.compile(r"[^A-Za-z0-9._-]")


def digits_up_to(maximum: int) -> str:
    """A regex for the decimal integers 0 to ``maximum``, leading zeros allowed, no longer
    than ``maximum`` is: for parameters that are integers but arrive as strings."""
    top = str(maximum)
    shorter = f"[0-9]{{1,{len(top) - 1}}}" if len(top) > 1 else None
    same = [
        f"{top[:i]}[0-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}"
        for i, digit in enumerate(top)
        if digit != "0"
    ]
    return "^(?:" + "|".join(filter(None, [shorter, *same, top])) + ")$"


def install(app: FastAPI, conveyor: Conveyor) -> None:
    """Make ``app.openapi()`` return the refined document (built once, on first use)."""
    generate = app.openapi

    def openapi() -> Schema:
        if app.openapi_schema is None:
            app.openapi_schema = refine(generate(), conveyor)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def refine(document: Schema, conveyor: Conveyor) -> Schema:
    components = document.setdefault("components", {}).setdefault("schemas", {})
    add_model(components, Problem)
    for path, item in document.get("paths", {}).items():
        if path not in UNLIMITED_PATHS:
            for operation in operations({"paths": {path: item}}):
                operation.setdefault("responses", {}).setdefault("429", _rate_limited())
    for operation in operations(document):
        _document_errors(operation)
        _parameters_never_null(operation)
        _event_streams(operation, components)
    _task_payloads(components, conveyor)
    _pipeline_steps(components, conveyor)
    for name in FASTAPI_ERROR_MODELS:
        components.pop(name, None)
    return document


def operations(document: Schema) -> Iterator[Schema]:
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            if method in {"get", "put", "post", "delete", "patch", "head", "options", "trace"}:
                yield operation


def add_model(components: Schema, model: type[BaseModel]) -> str:
    """Put ``model`` (and the models it uses) in the components; returns its reference."""
    schema = model.model_json_schema(ref_template=REF)
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(model.__name__, schema)
    return REF.format(model=model.__name__)


_PROBLEM = REF.format(model=Problem.__name__)


def _problem(description: str) -> Schema:
    return {"description": description, "content": {PROBLEM_JSON: {"schema": {"$ref": _PROBLEM}}}}


def _rate_limited() -> Schema:
    response = _problem("Too Many Requests: the caller's request budget is spent")
    response["headers"] = {
        "Retry-After": {
            "description": "Whole seconds until a request will be allowed.",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return response


def _document_errors(operation: Schema) -> None:
    responses: Schema = operation.setdefault("responses", {})
    extra: list[int] = [431]
    if operation.get("parameters") or operation.get("requestBody"):
        extra.append(422)
    if operation.get("requestBody"):
        extra += [400, 413]
    for code in extra:
        responses.setdefault(str(code), _problem(HTTPStatus(code).phrase))
    for status, response in responses.items():
        if status[0] not in "45":
            continue
        content = response.setdefault("content", {})
        json = content.pop("application/json", {}).get("schema")
        schema = json or content.get(PROBLEM_JSON, {}).get("schema")
        if not schema or schema.get("$ref", "").rsplit("/", 1)[-1] in FASTAPI_ERROR_MODELS:
            schema = {"$ref": _PROBLEM}
        content[PROBLEM_JSON] = {"schema": schema}


def _parameters_never_null(operation: Schema) -> None:
    for parameter in operation.get("parameters", ()):
        schema = parameter.get("schema", {})
        variants = schema.get("anyOf")
        if not variants:
            continue
        kept = [v for v in variants if v.get("type") != "null"]
        if len(kept) == len(variants):
            continue
        del schema["anyOf"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept
        if schema.get("default", ...) is None:
            del schema["default"]


#: Event types of a pipeline's stream: its own, its steps', and its jobs'.
PIPELINE_EVENT_TYPES = ("pipeline", "step", *(t.value for t in EventType))


def _event_streams(operation: Schema, components: Schema) -> None:
    for response in operation.get("responses", {}).values():
        content = response.get("content", {})
        if EVENT_STREAM not in content:
            continue
        content.pop("application/json", None)  # FastAPI's guess for the return type
        declared = content[EVENT_STREAM].get("schema", {}).get("x-event")
        if declared == PipelineEvent.__name__:
            schema = event_schema(add_model(components, PipelineEvent), PIPELINE_EVENT_TYPES)
        else:
            schema = event_schema(add_model(components, Event))
        content[EVENT_STREAM] = {"schema": schema}


def event_schema(event_ref: str, types: tuple[str, ...] | None = None) -> Schema:
    """One server-sent event as clients parse it: ``event``, ``id``, and JSON ``data``."""
    return {
        "type": "object",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"type": "string", "enum": list(types or [t.value for t in EventType])},
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": event_ref},
            },
        },
    }


def _task_payloads(components: Schema, conveyor: Conveyor) -> None:
    """``JobRequest`` and ``ScheduleRequest`` as one variant per task: its name, and its
    payload model's schema."""
    for name in ("JobRequest", "ScheduleRequest"):
        request = components.get(name)
        if request is not None:
            _variants(request, components, conveyor)


def _variants(request: Schema, components: Schema, conveyor: Conveyor) -> None:
    variants = []
    for name in sorted(conveyor.tasks):
        model = conveyor.tasks[name].payload_model
        reference = _unique_model(components, model, f"{_COMPONENT_NAME.sub('_', name)}.Payload")
        variants.append({"properties": {"task": {"const": name}, "payload": {"$ref": reference}}})
    if variants:
        request["oneOf"] = variants
        request["description"] = (
            f"{request.get('description', '')} The payload is checked against the schema of"
            " the task named; one variant per registered task."
        ).strip()


def _pipeline_steps(components: Schema, conveyor: Conveyor) -> None:
    """``StepRequest`` as one variant per task, like ``JobRequest``; a task whose payload
    has required fields needs a ``payload`` unless the step maps (its items are the
    payloads). ``PipelineRequest`` holds at most the configured number of steps."""
    pipeline = components.get("PipelineRequest")
    if pipeline is not None:
        steps = pipeline.get("properties", {}).get("steps", {})
        steps["maxItems"] = conveyor.settings.pipeline_max_steps
    request = components.get("StepRequest")
    if request is None:
        return
    variants = []
    for name in sorted(conveyor.tasks):
        model = conveyor.tasks[name].payload_model
        reference = _unique_model(components, model, f"{_COMPONENT_NAME.sub('_', name)}.Payload")
        variant: Schema = {
            "properties": {
                "task": {"const": name},
                "payload": {"anyOf": [{"$ref": reference}, {"type": "null"}]},
            }
        }
        if model.model_json_schema().get("required"):
            variant["anyOf"] = [
                {"required": ["payload"], "properties": {"payload": {"$ref": reference}}},
                {"required": ["map"], "properties": {"map": {"type": "string"}}},
            ]
        variants.append(variant)
    if variants:
        request["oneOf"] = variants


def _unique_model(components: Schema, model: type[BaseModel], fallback: str) -> str:
    """The model's component, under its own name unless another model has that name."""
    schema = model.model_json_schema(ref_template=REF)
    definitions = schema.pop("$defs", {})
    name = model.__name__
    if components.get(name, schema) != schema:
        name = fallback
    for nested, definition in definitions.items():
        components.setdefault(nested, definition)
    components[name] = schema
    return REF.format(model=name)
