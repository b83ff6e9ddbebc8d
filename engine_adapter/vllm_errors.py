"""vLLM's errors as our own types (engine_adapter.errors): the one place an engine call's failure is translated.
Every call into vLLM in this package runs inside `engine_errors`."""

import contextlib

from vllm.exceptions import GracefulHTTPError, ProfilerAlreadyActiveError, VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

from engine_adapter.errors import (
    EngineCapacityError,
    EngineDeadError,
    EngineError,
    EngineOperationError,
    EngineRequestError,
    EngineStateError,
)
from engine_adapter.sampling import SAMPLING_FIELDS


@contextlib.contextmanager
def engine_errors(parameter: str | None = None, fatal: bool = False, operation: str | None = None):
    """Translate what a call into vLLM raises.

    `parameter`: the request field the call checks; vLLM's refusals (and the ValueErrors its
    backends raise, a NUL in a regex and the like) then name it. `fatal`: any other failure means
    the engine is gone. `operation`: a control call (pause, reload, ...); any other failure is that
    operation's (vLLM reports an engine-core utility's failure as a plain Exception).
    """
    try:
        yield
    except EngineError:
        raise
    except VllmEngineDeadError as exc:
        raise EngineDeadError(str(exc)) from exc
    except VLLMClientError as exc:
        raise request_error(exc, parameter) from exc
    except ProfilerAlreadyActiveError as exc:
        raise EngineStateError("a profile is already running: call StopProfile first") from exc
    except GracefulHTTPError as exc:  # admission control: the queue or the prefill backlog is full
        raise EngineCapacityError(exc.message) from exc
    except ValueError as exc:
        if parameter is not None:
            raise request_error(exc, parameter) from exc
        if operation is None:
            raise
        raise EngineOperationError(f"{operation} failed in the engine: {exc}") from exc
    except Exception as exc:
        if fatal:
            raise EngineDeadError(str(exc)) from exc
        if operation is None:
            raise
        raise EngineOperationError(f"{operation} failed in the engine: {exc}") from exc


def request_error(exc: Exception, parameter: str | None = None) -> EngineRequestError:
    """vLLM's reason, prefixed with the request field it is about: given, vLLM's `parameter`, or the
    sampling field its message starts with (SamplingParams' own checks often name no parameter)."""
    message = exc.args[0] if exc.args else str(exc)
    parameter = parameter or getattr(exc, "parameter", None)
    if parameter is None and message.split(" ", 1)[0] in SAMPLING_FIELDS:
        parameter = message.split(" ", 1)[0]
    return EngineRequestError(f"{f'sampling_params.{parameter}' if parameter else 'request'}: {message}")
