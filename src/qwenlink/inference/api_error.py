"""The error a client is told about, in OpenAI's shape; shared by the schema, the API layer and the transport."""

from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    """A refusal the client is told about: an HTTP status plus OpenAI's error object (`body()`)."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, kind: str = "invalid_request_error",
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
