"""The RL control endpoint: HTTP routes an RL loop, or SMG's RL control plane (`rl.control_url`), calls to
pause, refit and resume this worker. aiohttp serves it on the gRPC server's event loop.

Two vocabularies, one behaviour (servicer/rl.py): vLLM's own RL routes (`/pause?mode=`, `/resume`,
`/update_weights`, ...) so a loop written for `vllm serve` works unchanged, and the names SMG's client
and SGLang-style frameworks send (`pause_generation`, `update_weights_from_disk`, ...).

Every call needs `Authorization: Bearer <key>` when a key is configured (without one the endpoint
binds loopback only; servicer/config.py refuses anything else). Errors are JSON
`{"success": false, "error": <code>, "message": <reason>}` with the status errors.http_status_for gives.
"""

import asyncio
import hmac
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from engine_adapter.types import PAUSE_MODES
from servicer.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    http_status_for,
)
from servicer.rl import RlController

logger = logging.getLogger(__name__)
MAX_BODY = 1 << 20  # control bodies are small JSON; SMG caps what it mirrors at 1 MiB too
# SGLang's pause modes, as vLLM's: in_place freezes requests where they are; retract also frees their KV
# (they recompute it on resume).
SGLANG_PAUSE_MODES = {"in_place": "keep", "retract": "keep"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _ok(**fields) -> web.Response:
    return web.json_response({"success": True, **fields})


async def _body(request: web.Request) -> dict:
    """The JSON object body ({} when empty)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"body: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"body: must be a JSON object, got {type(body).__name__}")
    return body


def _get(body: dict, name: str, kind: type | tuple[type, ...], default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise InvalidArgument(f"{name}: required")
        return default
    value = body[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InvalidArgument(f"{name}: must be {names}, got {type(value).__name__}")
    return value


def _query_bool(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise InvalidArgument(f"{name}: {value!r} is not a boolean (true or false)")


def _query_float(request: web.Request, name: str, default: float) -> float:
    value = request.query.get(name)
    try:
        number = default if value is None else float(value)
    except ValueError:
        raise InvalidArgument(f"{name}: {value!r} is not a number") from None
    if not 0 <= number < float("inf"):
        raise InvalidArgument(f"{name}: {value!r} must be a non-negative number of seconds")
    return number


def _query_int(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise InvalidArgument(f"{name}: {value!r} is not an integer") from None


class ControlEndpoint:
    """The aiohttp application and its listening site."""

    def __init__(self, controller: RlController, api_key: str = "", allow_collective_rpc: bool = False):
        self.rl = controller
        self._key = api_key.encode()
        self._allow_rpc = allow_collective_rpc
        self.app = web.Application(middlewares=[self._errors, self._authenticate], client_max_size=MAX_BODY)
        self._add_routes()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def _add_routes(self) -> None:
        post, get, both = ("POST",), ("GET",), ("GET", "POST")
        routes: list[tuple[tuple[str, ...], str, Handler]] = [
            # vLLM's RL routes (vllm/entrypoints/rl/online and serve/dev: sleep, cache).
            (post, "/pause", self.pause),
            (post, "/resume", self.resume),
            (get, "/is_paused", self.is_paused),
            (post, "/sleep", self.sleep),
            (post, "/wake_up", self.wake_up),
            (get, "/is_sleeping", self.is_sleeping),
            (post, "/reset_prefix_cache", self.reset_prefix_cache),
            (post, "/init_weight_transfer_engine", self.init_weight_transfer_engine),
            (post, "/start_weight_update", self.start_weight_update),
            (post, "/update_weights", self.update_weights),
            (post, "/finish_weight_update", self.finish_weight_update),
            (post, "/update_weight_version", self.update_weight_version),
            (get, "/weight_info", self.weight_info),
            (post, "/collective_rpc", self.collective_rpc),
            # SMG's client and SGLang-style frameworks.
            (post, "/pause_generation", self.pause_generation),
            (post, "/continue_generation", self.resume),
            (post, "/update_weights_from_disk", self.update_weights_from_disk),
            (both, "/flush_cache", self.flush_cache),
            (both, "/get_weight_version", self.weight_info),
            (both, "/get_server_info", self.server_info),
            (get, "/health", self.health),
        ]
        for methods, path, handler in routes:
            for method in methods:
                self.app.router.add_route(method, path, handler)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: no such route, wrong method, body too large
            if exc.status < 400:
                raise
            message = f"{request.method} {request.path}: {exc.reason}"
            if exc.status == 404:
                message += " (the routes are listed in docs/rl.md)"
            return web.json_response(
                {"success": False, "error": exc.reason.lower().replace(" ", "_"), "message": message}, status=exc.status
            )
        except Exception as exc:
            status, code, message = http_status_for(exc)
            log = logger.exception if status >= 500 else logger.info
            log("control %s %s: %d %s", request.method, request.path, status, message)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return web.json_response(
                {"success": False, "error": code, "message": message}, status=status, headers=headers
            )

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._key:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
                raise Unauthenticated("Authorization: a bearer key is required (the worker's control key)")
        return await handler(request)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on host:port (0 picks one); returns the port."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        site = web.SockSite(self._runner, sock, ssl_context=ssl_context)
        await site.start()
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- routes: pause state ------------------------------------------------------------------------------

    async def pause(self, request: web.Request) -> web.Response:
        """vLLM's POST /pause?mode=abort|wait|keep&clear_cache=true (clear_cache is ignored under keep)."""
        mode = request.query.get("mode", "abort")
        clear_cache = _query_bool(request, "clear_cache", True) and mode != "keep"
        await self.rl.pause(mode, clear_cache=clear_cache)
        return _ok(status="paused", mode=mode)

    async def pause_generation(self, request: web.Request) -> web.Response:
        """SMG's / SGLang's `{"mode": ...}`: vLLM's modes, or SGLang's in_place and retract."""
        requested = _get(await _body(request), "mode", str, "abort")
        mode = SGLANG_PAUSE_MODES.get(requested, requested)
        if mode not in PAUSE_MODES:
            raise InvalidArgument(f"mode: {requested!r} is not one of {', '.join((*PAUSE_MODES, *SGLANG_PAUSE_MODES))}")
        await self.rl.pause(mode)
        if requested == "retract":
            await self.rl.retract()
        return _ok(status="paused", mode=requested)

    async def resume(self, request: web.Request) -> web.Response:
        await _body(request)  # SGLang-style callers send {}; anything else that is not JSON is an error
        await self.rl.resume()
        return _ok(status="resumed")

    async def is_paused(self, request: web.Request) -> web.Response:
        return web.json_response({"is_paused": await self.rl.is_paused()})

    async def sleep(self, request: web.Request) -> web.Response:
        level = _query_int(request, "level", 1)
        await self.rl.sleep(level, request.query.get("mode", "abort"))
        return _ok(status="sleeping", level=level)

    async def wake_up(self, request: web.Request) -> web.Response:
        tags = request.query.getall("tags", []) or None
        awake = await self.rl.wake_up(tags)
        return _ok(status="awake" if awake else "sleeping", tags=tags)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": await self.rl.control.is_sleeping()})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        done = await self.rl.reset_prefix_cache(
            _query_bool(request, "reset_running_requests", False), _query_bool(request, "reset_external", False)
        )
        return web.json_response({"success": done})

    async def flush_cache(self, request: web.Request) -> web.Response:
        """SGLang's flush: the prefix and encoder caches, retried for up to `?timeout=` seconds while requests
        still hold cache blocks; 409 if they still do then."""
        timeout = _query_float(request, "timeout", 0.0)
        deadline = time.monotonic() + timeout
        while not await self.rl.flush():
            if time.monotonic() >= deadline:
                raise FailedPrecondition(
                    "flush_cache: requests are still running; pause them (mode wait), "
                    "or pass ?timeout=SECONDS to wait for them"
                )
            await asyncio.sleep(0.05)
        return _ok(message="prefix and encoder caches flushed")

    # -- routes: weights ----------------------------------------------------------------------------------

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await _body(request)
        path = _get(body, "model_path", str, required=True)
        version = _get(body, "weight_version", str)
        load_format = _get(body, "load_format", str)
        if load_format not in (None, "auto", "safetensors"):
            raise InvalidArgument(f"load_format: {load_format!r}: in-place refits read safetensors checkpoints")
        # flush_cache: false is accepted but never honoured: a refit always drops what the old weights computed.
        _get(body, "flush_cache", bool, True)
        abort = _get(body, "abort_all_requests", bool, False)  # SGLang's: end in-flight requests instead of draining
        record = await self.rl.refit_from_disk(path, version, drain="abort" if abort else "wait")
        return _ok(
            message=f"weights loaded from {path} in {record.seconds:.2f} s; caches flushed",
            num_paused_requests=0,
            checkpoint_path=path,
            weight_version=await self.rl.control.weight_version(),
            seconds=round(record.seconds, 3),
        )

    async def init_weight_transfer_engine(self, request: web.Request) -> web.Response:
        init_info = _get(await _body(request), "init_info", dict, required=True)
        self.rl.control.require_weight_transfer()
        await self.rl.control.init_weight_transfer(init_info)
        return _ok(message="Weight transfer initialized")

    async def start_weight_update(self, request: web.Request) -> web.Response:
        await _body(request)
        await self.rl.start_weight_update()
        return _ok(message="Weight update started")

    async def update_weights(self, request: web.Request) -> web.Response:
        update_info = _get(await _body(request), "update_info", (dict, list), required=True)
        await self.rl.update_weights(update_info)
        return _ok(message="Weights updated")

    async def finish_weight_update(self, request: web.Request) -> web.Response:
        version = _get(await _body(request), "weight_version", str)
        await self.rl.finish_weight_update(version)
        return _ok(message="Weight update finished", weight_version=await self.rl.control.weight_version())

    async def update_weight_version(self, request: web.Request) -> web.Response:
        """vLLM's and SGLang's route: relabel the running weights. SGLang also aborts in-flight requests by
        default; here only when the body asks for it (`abort_all_requests: true`), as vLLM never does."""
        body = await _body(request)
        version = _get(body, "new_version", str, required=True)
        await self.rl.set_weight_version(version, abort_all_requests=_get(body, "abort_all_requests", bool, False))
        return _ok(new_version=version, message=f"Weight version updated to {version}")

    async def weight_info(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": await self.rl.control.weight_version()})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        """vLLM's dev-mode route: any worker method by name, so off unless the operator allows it."""
        if not self._allow_rpc:
            raise PermissionDenied(
                "collective_rpc: runs any method on the engine's workers; start the servicer "
                "with --control-allow-collective-rpc to allow it"
            )
        body = await _body(request)
        method = _get(body, "method", str, required=True)
        results = await self.rl.control.collective_rpc(
            method,
            tuple(_get(body, "args", list, [])),
            _get(body, "kwargs", dict, {}),
            _get(body, "timeout", (int, float)),
        )
        return web.Response(
            text=json.dumps({"success": True, "results": results}, default=repr), content_type="application/json"
        )

    # -- routes: state ------------------------------------------------------------------------------------

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response(await self.rl.status())

    async def health(self, request: web.Request) -> web.Response:
        if not self.rl.healthy:
            raise Unavailable("the engine is not running")
        return web.json_response({"healthy": True})
