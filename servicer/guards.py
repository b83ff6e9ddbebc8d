"""The one place an RPC's exception becomes its gRPC status: every RPC of the servicer is wrapped by `guard`
(unary) or `guard_stream` (server-streaming), which map through errors.status_for and abort the call."""

import asyncio
import contextlib
import functools
import logging

import grpc

from servicer.errors import status_for

logger = logging.getLogger(__name__)


async def fail(context: grpc.aio.ServicerContext, exc: BaseException, what: str) -> None:
    code, message, metadata = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("%s failed", what, exc_info=exc)
    else:
        logger.info("%s refused: %s %s", what, code.name, message)
    await context.abort(code, message, trailing_metadata=metadata)


def guard(rpc):
    """Map any exception a unary RPC raises to its status, through `fail`."""

    @functools.wraps(rpc)
    async def wrapper(self, request, context):
        try:
            return await rpc(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):  # already the call's end, or already its status
            raise
        except Exception as exc:
            await fail(context, exc, rpc.__name__)

    return wrapper


def guard_stream(rpc):
    """`guard` for a server-streaming RPC: what its generator raises becomes its status, through `fail`."""

    @functools.wraps(rpc)
    async def wrapper(self, request, context):
        try:
            async with contextlib.aclosing(rpc(self, request, context)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):  # already the call's end, or already its status
            raise
        except Exception as exc:
            await fail(context, exc, f"{rpc.__name__} {getattr(request, 'request_id', '')}".rstrip())

    return wrapper
