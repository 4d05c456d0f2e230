"""The exception request handling raises for a client error; server/app.py turns it into an
OpenAI error body (`{"error": {"message", "type", "param", "code"}}`) with its HTTP status."""
from __future__ import annotations


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
