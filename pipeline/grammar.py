"""What the two grammars (segment conditions in `pipeline.marketing.segments`, workflow steps in
`pipeline.workflows.definitions`) share: pydantic models parse a tree once, and the same models give
/openapi.json its schemas, so the schema and the validation cannot disagree.

* A value's check and its JSON schema are written side by side (`Atom`, the metadata of an Annotated
  type such as `Annotated[str, Atom(check, schema)]`: mypy sees the plain type); a failed check raises
  `problem(code, message)`, which the API shows as is.
* The kind of a node is chosen by a callable `Discriminator` from its keys (`TaggedUnion`, the metadata
  of the union of the nodes). Its choices are tagged `<...>` (never a model's field name): `field_errors`
  drops the tags from the paths it reports. A choice that only exists to report why a node fits none of
  the shapes is left out of the schema (`unlisted`).
* `field_errors` is the one place pydantic's own error types become the API's FieldError codes.
"""

from __future__ import annotations

import email.utils
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeAlias, Union, get_args

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue, PydanticOmit
from pydantic_core import CoreSchema, PydanticCustomError

from pipeline.errors import FieldError

LIMITS = "limits"
"""The error type whose context carries several FieldErrors at once (a tree past its size limits)."""
NOT_AN_OBJECT = {"invalid_condition": "a condition object", "invalid_step": "a step object"}
"""A discriminator's error type, and what the node should have been when it is not even an object."""
NO_NUL = "^[^\\u0000]*$"
"""The JSON-schema pattern of text without NUL (the API refuses NUL outside `data`)."""
EVENT_NAME_PATTERN = "^[^\\u0000]*[^\\u0000\\s][^\\u0000]*$"
"""Not blank, no NUL (NUL is not white space: it may not be the one character that is not)."""


def header_addresses(fields: list[str]) -> list[str]:
    """The addresses in header fields (`email.utils.getaddresses`), none from fields nested past Python's
    recursion limit: its parser recurses into comments and groups, and a From of 1,000 `(` raised
    RecursionError (the relay's DATA answered with a crash)."""
    try:
        return [address for _, address in email.utils.getaddresses(fields) if address]
    except RecursionError:
        return []


def header_address(field: str) -> str:
    """The first address of a header field (`email.utils.parseaddr`), '' when there is none or it is nested
    past Python's recursion limit (see `header_addresses`)."""
    try:
        return email.utils.parseaddr(field)[1]
    except RecursionError:
        return ""


@functools.lru_cache(maxsize=4096)
def normalize_email(value: str) -> str:
    """Check syntax (no DNS) and lower-case the address; the stored form of every email. Kept for the
    addresses seen last: every send checks its From address and most recipients come back, and
    email-validator's parse is a tenth of a send's time."""
    if len(value) > 320:
        raise PydanticCustomError("invalid_string", "Invalid email: longer than 320 characters")
    try:
        result = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise PydanticCustomError("invalid_string", "Invalid email: {reason}", {"reason": str(exc)}) from None
    return result.normalized.lower()


STORED = {"stored": True}
"""Validation context for a definition read back from the database: see `whole_number`."""


class Node(BaseModel):
    """A node of a grammar: every key is known."""

    model_config = ConfigDict(extra="forbid")
    TAG: ClassVar[str]
    """Its choice's tag in the grammar's union."""
    WHERE: ClassVar[str] = "here"
    """How an unknown key's message names the node ("here", "in a send step")."""


class Unlisted:
    """Marks a union's choice that only reports why a node fits none of the listed shapes: left out of
    the schema (its model's definition is then unused, and dropped)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        raise PydanticOmit


class AnyOf:
    """The discriminated union's schema as `anyOf` (its choices exclude each other, so anyOf and pydantic's
    default oneOf say the same; anyOf is cheaper for schema-driven generators)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        if "oneOf" in schema:
            schema = {"anyOf": schema.pop("oneOf"), **schema}
        return schema


@dataclass(frozen=True)
class TaggedUnion:
    """The metadata of the union of a grammar's nodes (`Annotated[A | B | C, TaggedUnion(tag, ...)]`): a
    node is parsed as the choice whose TAG `tag(node)` returns (None: `error_type`, `error_message`); the
    `unlisted` choices are left out of the schema."""

    tag: Callable[[Any], str | None]
    error_type: str
    error_message: str
    unlisted: tuple[type[Node], ...] = ()

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        choices = [Annotated[node, Tag(node.TAG), Unlisted] if node in self.unlisted else Annotated[node, Tag(node.TAG)]
                   for node in get_args(source)]
        return handler(Annotated[Union[tuple(choices)], Discriminator(  # noqa: UP007
            self.tag, custom_error_type=self.error_type, custom_error_message=self.error_message), AnyOf])


def problem(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, message)


@dataclass(frozen=True)
class Atom:
    """The metadata of a value type `Annotated[T, Atom(check, schema)]`: `check(value)` (or
    `check(value, info)`) returns the value, a T, or raises a `problem` (T's own validation is not used);
    `schema` says the same in JSON schema."""

    check: Callable[..., Any]
    schema: dict[str, Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return PlainValidator(self.check).__get_pydantic_core_schema__(source, handler)

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return WithJsonSchema(self.schema).__get_pydantic_json_schema__(core_schema, handler)

    def __hash__(self) -> int:
        """By its check alone: `schema` (a dict) cannot be hashed, and a Union hashes its members."""
        return hash(self.check)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise problem("invalid_type", "Expected true or false")
    return value


Boolean: TypeAlias = Annotated[bool, Atom(_boolean, {"type": "boolean"})]


def text_problem(value: str, limit: int) -> PydanticCustomError | None:
    if len(value) > limit:
        return problem("too_big", f"At most {limit} characters")
    if "\x00" in value:
        return problem("invalid_string", "Text may not contain NUL")
    return None


def event_name(limit: int) -> Atom:
    """An event name (`Annotated[str, event_name(limit)]`): not blank, at most `limit` characters, no NUL."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise problem("invalid_type", "Expected an event name")
        if not value.strip():
            raise problem("too_small", "Event names are not blank")
        if (found := text_problem(value, limit)) is not None:
            raise found
        return value

    return Atom(check, {"type": "string", "minLength": 1, "maxLength": limit, "pattern": EVENT_NAME_PATTERN})


def whole_number(limit: int, why: str = "", schema: dict[str, Any] | None = None) -> Atom:
    """A whole number 1…limit (`Annotated[int, whole_number(limit)]`); an integral float such as 5.0 is
    taken as 5. A stored definition (`STORED` context) may hold 0: the engine always ran those."""
    least_stored = 0

    def check(value: Any, info: ValidationInfo) -> int:
        least = least_stored if info.context == STORED else 1
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            raise problem("invalid_type", "Expected a whole number")
        if value < least:
            raise problem("too_small", f"At least {least}")
        if value > limit:
            raise problem("too_big", f"At most {limit}" + (f": {why}" if why else ""))
        return int(value)

    return Atom(check, {"type": "integer", "minimum": 1, "maximum": limit, **(schema or {})})


def _aliases(model: type[BaseModel]) -> list[str]:
    return sorted(field.alias or name for name, field in model.model_fields.items())


def field_errors(exc: ValidationError, path: str, tags: Mapping[str, type[Node]],
                 limit: int) -> list[FieldError]:
    """The errors of a grammar's validation as the API names them: `path` and the keys and indexes down
    to the value (the `<tag>` of each chosen node dropped), with the grammar's own codes. `tags` maps each
    tag to its model (to list the keys a node may have)."""
    errors: list[FieldError] = []
    for err in exc.errors(include_url=False):
        loc, kind, message = err["loc"], err["type"], err["msg"]
        key = len(loc) - 1 if kind == "extra_forbidden" else -1
        """An unknown key is the last part of its loc, even when it is spelled like a tag."""
        parts = [str(part) for i, part in enumerate(loc) if i == key or part not in tags]
        where = ".".join([path, *parts]) if path else ".".join(parts)
        if kind == LIMITS:
            errors.extend(FieldError(".".join(filter(None, [where, rest])), text, code)
                          for rest, text, code in err["ctx"]["errors"])
            continue
        if kind == "missing":
            kind, message = "required", "Required"
        elif kind == "extra_forbidden":
            model = tags.get(str(loc[-2])) if len(loc) > 1 else None
            allowed = f"; expected only {', '.join(_aliases(model))}" if model else ""
            kind = "unknown_key"
            message = f"Unknown key '{loc[-1]}' {model.WHERE if model else 'here'}{allowed}"
        elif kind in NOT_AN_OBJECT and not isinstance(err.get("input"), dict):
            kind, message = "invalid_type", f"Expected {NOT_AN_OBJECT[kind]}"
        errors.append(FieldError(where, message, kind))
    return errors[:limit]
