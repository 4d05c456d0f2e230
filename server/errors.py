"""The OpenAI-shaped client error the request handling raises, and the error body it becomes.

    raise OpenAIError("logit_bias: token id 999999 is out of vocabulary", param="logit_bias")
    -> HTTP 400 {"error": {"message": ..., "type": "invalid_request_error", "param": "logit_bias", "code": null}}
"""
from __future__ import annotations

from typing import Any

from server import protocol as P


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
    return P.ErrorResponse(error=P.ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()
