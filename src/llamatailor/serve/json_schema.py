"""A request's JSON schema (`response_format.json_schema.schema`) checked before an engine turns it into a
grammar, so that a broken schema gets a 400 naming the field rather than the engine's 400 without one
(llama.cpp) or a 500 (vLLM).

The check is the `jsonschema` package's metaschema validation: against the draft the schema's `$schema`
names, else against each draft from 2020-12 back to 4 (a schema without `$schema` in draft 7's or 4's forms,
`items` as a list or a boolean `exclusiveMinimum`, is valid JSON Schema); the error shown is 2020-12's.
Each local `$ref` ("#...") must also point at something (`referencing`, as validation would resolve it). A
schema that passes may still be one an engine cannot compile (a `pattern` its regex engine does not read),
which the engine then refuses.
"""

from collections.abc import Iterator
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

DRAFTS: tuple[type[Validator], ...] = (
    jsonschema.Draft202012Validator,
    jsonschema.Draft201909Validator,
    jsonschema.Draft7Validator,
    jsonschema.Draft6Validator,
    jsonschema.Draft4Validator,
)
DATA_KEYWORDS = ("const", "default", "enum", "examples")  # their values are data, not schemas


class SchemaError(ValueError):
    """A schema that is not valid JSON Schema; the message starts with the place ("#/properties/age")."""


def check_schema(schema: dict[str, Any]) -> None:
    """Raises SchemaError naming the first problem's place in `schema` (a JSON pointer) and what is wrong:
    a keyword the metaschema does not allow, or a local `$ref` to nothing."""
    named = schema.get("$schema")
    drafts = DRAFTS
    if isinstance(named, str):
        drafts = (jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator),)
    problems = [best_match(draft(draft.META_SCHEMA).iter_errors(schema)) for draft in drafts]
    if all(problem is not None for problem in problems):
        first = problems[0]
        assert first is not None
        raise SchemaError(f"{pointer(first.absolute_path)}: {first.message}")
    resolver = Registry().with_resource("", Resource.from_contents(schema, DRAFT202012)).resolver()
    for place, reference in local_references(schema, []):
        try:
            resolver.lookup(reference)
        except Unresolvable:
            raise SchemaError(
                f"{pointer([*place, '$ref'])}: {reference!r} points at nothing in this schema"
            ) from None


def local_references(node: Any, place: list[str | int]) -> Iterator[tuple[list[str | int], str]]:
    """(place, reference) of each `$ref` starting with "#" in `node`, outside data keywords and outside
    subschemas with their own `$id` (a reference there is relative to that resource)."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from local_references(item, [*place, index])
    elif isinstance(node, dict):
        if place and "$id" in node:
            return
        reference = node.get("$ref")
        if isinstance(reference, str) and reference.startswith("#"):
            yield place, reference
        for key, value in node.items():
            if key not in DATA_KEYWORDS:
                yield from local_references(value, [*place, key])


def pointer(path: Any) -> str:
    """A JSON pointer ("#/properties/a~1b") to `path`'s keys and indices (RFC 6901 escapes)."""
    return "#" + "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)
