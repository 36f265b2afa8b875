"""The JSON API.

A request that changes data runs its API methods, then ends the batch with
``finalise(commit=True)``: the data commits, then the notifications go out.
An error rolls the whole request back with ``finalise(commit=False)``, so a
failed request changes nothing and notifies nobody.
"""

from __future__ import annotations

import typing as t

from flask import Blueprint, Flask, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import (
    BadRequest,
    HTTPException,
    RequestEntityTooLarge,
    UnsupportedMediaType,
)
from werkzeug.routing import IntegerConverter, ValidationError

from notifyqueue import BatchResult, finalise

from . import schema
from .extensions import db
from .froggies import (
    FroggyNotFound,
    apply,
    create_froggy,
    get_froggy,
    make_froggy_brightpink_and_highjump,
    make_froggy_jump,
    update_froggy_colour,
)
from .models import Froggy

bp = Blueprint("froggies", __name__)


class IdConverter(IntegerConverter):
    """``<int:...>`` that answers 404, not 500, for an id too long for ``int()``.

    Older Werkzeug releases (2.3, the oldest this project supports) let
    ``int()``'s ValueError for more than ``sys.get_int_max_str_digits()``
    digits (4300) escape from the converter.
    """

    def to_python(self, value: str) -> t.Any:
        try:
            return super().to_python(value)
        except ValueError:
            raise ValidationError() from None


Response = tuple[dict[str, t.Any], int] | tuple[dict[str, t.Any], int, dict[str, str]]


@bp.post("/froggies")
def create() -> Response:
    fields = schema.CREATE.check("The body", _json_body())
    froggy = create_froggy(**fields)
    result = finalise(commit=True)
    location = url_for(".read", froggy_id=froggy.id)
    return _changed("froggy", froggy.to_dict(), result), 201, {"Location": location}


@bp.get("/froggies")
def list_froggies() -> Response:
    froggies = db.session.scalars(select(Froggy).order_by(Froggy.id))
    return {"froggies": [froggy.to_dict() for froggy in froggies]}, 200


@bp.get("/froggies/<int:froggy_id>")
def read(froggy_id: int) -> Response:
    return {"froggy": get_froggy(froggy_id).to_dict()}, 200


@bp.put("/froggies/<int:froggy_id>/colour")
def change_colour(froggy_id: int) -> Response:
    fields = schema.COLOUR.check("The body", _json_body())
    froggy = get_froggy(froggy_id)
    update_froggy_colour(froggy, fields["colour"])
    result = finalise(commit=True)
    return _changed("froggy", froggy.to_dict(), result), 200


@bp.post("/froggies/<int:froggy_id>/jump")
def jump(froggy_id: int) -> Response:
    fields = schema.JUMP.check("The body", _json_body())
    froggy = get_froggy(froggy_id)
    make_froggy_jump(froggy, fields["jump_height"])
    result = finalise(commit=True)
    return _changed("froggy", froggy.to_dict(), result), 200


@bp.post("/froggies/<int:froggy_id>/brightpink-and-highjump")
def brightpink_and_highjump(froggy_id: int) -> Response:
    froggy = get_froggy(froggy_id)
    result = make_froggy_brightpink_and_highjump(froggy)  # it commits
    return _changed("froggy", froggy.to_dict(), result), 200


@bp.post("/batch")
def batch() -> Response:
    """Run every operation in one transaction: all of them or none."""
    operations = schema.batch(_json_body())
    froggies = []
    for index, (operation, fields) in enumerate(operations):
        try:
            froggies.append(apply(operation, fields))
        except FroggyNotFound as exc:
            raise FroggyNotFound(exc.froggy_id, f"operations[{index}]") from None
    result = finalise(commit=True)
    return _changed("froggies", [froggy.to_dict() for froggy in froggies], result), 200


def _json_body() -> t.Any:
    try:
        return request.get_json()
    except UnsupportedMediaType:
        raise schema.InputError(
            "Send the body as JSON, with 'Content-Type: application/json'.", 415
        ) from None
    except RequestEntityTooLarge:
        raise schema.InputError(
            f"The body is larger than the limit of {request.max_content_length} bytes.",
            413,
        ) from None
    except BadRequest as exc:
        raise schema.InputError("The body is not valid JSON.") from exc
    except RecursionError:
        raise schema.InputError("The body's JSON is nested too deeply.") from None


def _changed(key: str, value: t.Any, result: BatchResult) -> dict[str, t.Any]:
    """The changed data (read after the commit) and what was notified."""
    return {
        key: value,
        "notifications": {
            "dispatched": [
                {"id": intent.id, "channel": intent.channel}
                for intent in result.dispatched
            ],
            "failed": [
                {"id": intent.id, "channel": intent.channel}
                for intent, _ in result.failed
            ],
            # Handed to background delivery: not sent yet when we answer.
            "pending": [
                {"id": intent.id, "channel": intent.channel}
                for intent in result.pending
            ],
        },
    }


def register_error_handlers(app: Flask) -> None:
    """Answer every error with JSON ``{"error": message}``."""

    def error(message: str, status: int) -> Response:
        # Roll back whatever the request changed, and drop its notifications.
        finalise(commit=False)
        return {"error": message}, status

    @app.errorhandler(schema.InputError)
    def bad_input(exc: schema.InputError) -> Response:
        return error(str(exc), exc.status)

    @app.errorhandler(FroggyNotFound)
    def not_found(exc: FroggyNotFound) -> Response:
        return error(str(exc), 404)

    @app.errorhandler(IntegrityError)
    def conflict(exc: IntegrityError) -> Response:
        return error(
            "The change conflicts with an existing froggy: names are unique.", 409
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status >= 500:
            # Flask has logged the cause. The session may be unusable; the
            # app context's teardown rolls it back and drops the notifications.
            return {"error": exc.description or exc.name}, status
        return error(exc.description or exc.name, status)
