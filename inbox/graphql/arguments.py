"""Every argument of every field, checked once at the GraphQL boundary for text that cannot be
stored.

JSON carries lone UTF-16 surrogates ("\\ud800"), which Python decodes into a `str` but UTF-8,
and with it the database's wire format, cannot encode. Left alone, such text reaches the
database gateway and fails there, far from the argument it came in. So `guard_arguments` wraps
the resolver of every field that takes arguments (and a subscription's subscribe function):
before it runs, its arguments (lists, input objects and JSON values included) are looked
through once by `storage.wire.unencodable`, which costs a flag test per ASCII string. Bad text
is a VALIDATION error whose `field` is the argument's path: ["tags", "1"],
["headers", "0", "value"], ["metadata", "<key>"] (["metadata"] for a bad key):

- a mutation whose payload has `errors: [UserError!]!` returns that payload with the error, its
  other fields null (an empty list, false, where they cannot be null);
- any other field (a query) raises the ValidationError: a GraphQL error that ErrorPolicy gives
  the code and field, as other query errors;
- a subscription raises a GraphQLError carrying them itself (ErrorPolicy does not see those).

The message never repeats the bad text (it could not be encoded in the answer either).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from graphql import (
    GraphQLError,
    GraphQLObjectType,
    GraphQLSchema,
    default_field_resolver,
    get_nullable_type,
)
from strawberry.types.base import StrawberryList, StrawberryOptional

from inbox.errors import UnencodableText
from inbox.graphql.types import UserError
from inbox.storage.wire import unencodable

_DEFINITION = "strawberry-definition"  # strawberry's back reference on a graphql-core type
_GUARDED = "__inbox_guarded__"


def bad_argument(args: dict[str, Any]) -> list[str] | None:
    """The path (argument name, then list indexes / object keys) of the first text in `args`
    that cannot be encoded; None when all can."""
    for name, value in args.items():
        kind = type(value)
        if kind is str:
            if value.isascii():
                continue
        elif value is None or kind is bool or kind is int:
            continue
        inner = unencodable(value)
        if inner is not None:
            return [name, *inner]
    return None


def argument_error(path: list[str]) -> UnencodableText:
    return UnencodableText(f"{'.'.join(path)} is not valid Unicode (it contains a lone "
                           "surrogate)", field=path)


def guard_arguments(schema: GraphQLSchema) -> None:
    """Wrap every field with arguments of `schema` (graphql-core's) in the check. Once per
    schema; a field already wrapped is left as it is."""
    for gtype in schema.type_map.values():
        if not isinstance(gtype, GraphQLObjectType) or gtype.name.startswith("__"):
            continue
        for field in gtype.fields.values():
            if not field.args:
                continue
            if gtype is schema.subscription_type and field.subscribe is not None:
                if not hasattr(field.subscribe, _GUARDED):
                    field.subscribe = _guarded_subscribe(field.subscribe)
            elif not hasattr(field.resolve, _GUARDED):
                field.resolve = _guarded(field.resolve or default_field_resolver,
                                         failure_payload(field.type))


def failure_payload(return_type: Any) -> Callable[[list[UserError]], Any] | None:
    """For a field returning a payload with `errors: [UserError!]!`: a function making that
    payload with the given errors and nothing else. None for any other field, or a payload
    with a field that has no empty value (then the error is raised instead)."""
    gtype = get_nullable_type(return_type)
    if not isinstance(gtype, GraphQLObjectType) or "errors" not in gtype.fields:
        return None
    definition = (gtype.extensions or {}).get(_DEFINITION)
    if definition is None:
        return None
    empty: dict[str, Callable[[], Any]] = {}
    for field in definition.fields:
        if field.base_resolver is not None or field.python_name == "errors":
            continue  # computed (a method), or the errors themselves
        kind = field.type
        if isinstance(kind, StrawberryOptional):
            empty[field.python_name] = lambda: None
        elif isinstance(kind, StrawberryList):
            empty[field.python_name] = list
        elif kind is bool:
            empty[field.python_name] = lambda: False
        else:
            return None
    origin = definition.origin

    def make(errors: list[UserError]) -> Any:
        return origin(**{name: value() for name, value in empty.items()}, errors=errors)

    return make


def _guarded(resolve: Callable[..., Any],
             failure: Callable[[list[UserError]], Any] | None) -> Callable[..., Any]:
    def guarded(source: Any, info: Any, **args: Any) -> Any:
        path = bad_argument(args)
        if path is not None:
            error = argument_error(path)
            if failure is None:
                raise error
            return failure([UserError.of(error)])
        return resolve(source, info, **args)

    setattr(guarded, _GUARDED, True)
    return guarded


def _guarded_subscribe(subscribe: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(source: Any, info: Any, **args: Any) -> Any:
        path = bad_argument(args)
        if path is not None:
            error = argument_error(path)
            raise GraphQLError(error.message, extensions={"code": error.code,
                                                          "field": error.field})
        return subscribe(source, info, **args)

    setattr(guarded, _GUARDED, True)
    return guarded
