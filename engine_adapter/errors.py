"""Errors the engine adapter raises, free of vLLM types so callers need not import vLLM."""


class EngineDeadError(RuntimeError):
    """The engine has stopped and cannot serve any request."""


class EngineRequestError(ValueError):
    """The engine refused this request's inputs (e.g. longer than the context)."""


class EngineCapacityError(RuntimeError):
    """The request is valid but does not fit a configured bound right now (e.g. the shared-memory ring)."""
