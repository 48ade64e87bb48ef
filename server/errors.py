"""The error every server module raises for a bad request, and its OpenAI JSON body.
A module of its own so that helpers of server/serving.py can raise it too."""

from __future__ import annotations

import logging
import uuid

from pagedserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client caused (or an overloaded/dead engine), in OpenAI's terms."""

    def __init__(self, message: str, status_code: int = 400,
                 type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status_code = message, status_code
        self.type, self.param, self.code = type, param, code


def error_body(error: APIError) -> dict:
    """OpenAI's error JSON."""
    return ErrorResponse(error=ErrorInfo(message=error.message, type=error.type,
                                         param=error.param, code=error.code)).model_dump()


def internal_error(exc: BaseException, where: str) -> APIError:
    """A 500 for a bug: the client gets an id to quote, the log gets the exception with
    that id; the exception's text never reaches the client."""
    error_id = uuid.uuid4().hex[:16]
    logger.error("unhandled error in %s (error id %s)", where, error_id, exc_info=exc)
    return APIError(f"internal server error (error id {error_id})", 500, "server_error",
                    code="internal_error")
