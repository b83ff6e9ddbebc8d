"""Errors the engine adapter raises, free of vLLM types so callers need not import vLLM."""


class EngineError(Exception):
    """Base of every error this package raises on purpose (vllm_errors.engine_errors passes them through)."""


class EngineDeadError(EngineError, RuntimeError):
    """The engine has stopped and cannot serve any request."""


class EngineRequestError(EngineError, ValueError):
    """The engine refused this request's inputs (e.g. longer than the context)."""


class EngineCapacityError(EngineError, RuntimeError):
    """The request is valid but does not fit a configured bound right now (e.g. the shared-memory ring)."""


class EngineRetryableError(EngineError, RuntimeError):
    """The engine failed this request for a passing reason; the same request may succeed on a retry."""


class EngineStateError(EngineError, RuntimeError):
    """The engine is not configured, or not in the state, this call needs (the message says which flag or call)."""


class EngineCursorError(EngineError, RuntimeError):
    """A stream position the engine can no longer (or cannot yet) serve from; start over from the beginning."""


class EngineOperationError(EngineError, RuntimeError):
    """A control operation (pause, reload, weight transfer, ...) failed inside the engine; the message says
    what was attempted and in what state it left the engine."""
