"""Errors the engine adapter raises, free of vLLM types so callers need not import vLLM."""


class EngineDeadError(RuntimeError):
    """The engine has stopped and cannot serve any request."""


class EngineRequestError(ValueError):
    """The engine refused this request's inputs (e.g. longer than the context)."""


class EngineCapacityError(RuntimeError):
    """The request is valid but does not fit a configured bound right now (e.g. the shared-memory ring)."""


class EngineRetryableError(RuntimeError):
    """The engine failed this request for a passing reason; the same request may succeed on a retry."""


class EngineStateError(RuntimeError):
    """The engine is not configured, or not in the state, this call needs (the message says which flag or call)."""


class EngineCursorError(RuntimeError):
    """A stream position the engine can no longer (or cannot yet) serve from; start over from the beginning."""


class EngineOperationError(RuntimeError):
    """A control operation (pause, reload, weight transfer, ...) failed inside the engine; the message says
    what was attempted and in what state it left the engine."""
