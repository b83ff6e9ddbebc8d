"""Errors the engine adapter raises, free of vLLM types so callers need not import vLLM."""


class EngineDeadError(RuntimeError):
    """The engine has stopped and cannot serve any request."""


class EngineRequestError(ValueError):
    """The engine refused this request's inputs (e.g. longer than the context)."""
