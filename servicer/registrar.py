"""Keeps this worker's entry in an SMG gateway carrying what SMG's RL control plane needs: the worker's
`rl.control_url`, its control key, and the operator's labels.

SMG 1.13 learns a gRPC worker's labels and key only through its API (`POST /workers`, `PATCH /workers/{id}`):
`--worker-urls` attaches none, its Kubernetes discovery copies no pod labels, and a worker it re-discovers
(a replaced pod, a restarted gateway) comes back without them. So the worker itself checks its entry every
`interval` seconds and patches what is missing; a worker the gateway does not list at all is added (SMG routes
chat to such API-added gRPC workers only in its IGW mode, `--enable-igw`; it fans RL calls out to them always).
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiohttp

logger = logging.getLogger(__name__)


class GatewayRegistration:
    """One worker's entry in one gateway, kept current by `run()` (a task cancelled at shutdown)."""

    def __init__(
        self,
        gateway_url: str,
        worker_url: str,
        labels: Callable[[], Awaitable[dict[str, str]]],
        api_key: str = "",
        gateway_key: str = "",
        interval_s: float = 10.0,
    ):
        self.gateway_url = gateway_url.rstrip("/")
        self.worker_url = worker_url
        self.labels = labels  # read each round: the weight version changes with refits
        self._api_key = api_key
        self._headers = {"Authorization": f"Bearer {gateway_key}"} if gateway_key else {}
        self.interval_s = interval_s
        self._keyed: str | None = None  # the entry id our key was last given to (SMG never shows keys back)
        self.registered = asyncio.Event()  # set once the gateway lists the worker with every label
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Check now (after a refit: the weight_version label)."""
        self._wake.set()

    async def run(self) -> None:
        async with aiohttp.ClientSession(headers=self._headers, timeout=aiohttp.ClientTimeout(total=30)) as http:
            while True:
                try:
                    await self.ensure(http)
                except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
                    logger.warning(
                        "gateway %s: registration not confirmed (%s); retrying in %.0f s",
                        self.gateway_url,
                        exc,
                        self.interval_s,
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)
                self._wake.clear()

    async def ensure(self, http: aiohttp.ClientSession) -> None:
        """One check: add the worker, or patch its labels and key, as the gateway's listing requires."""
        async with http.get(f"{self.gateway_url}/workers") as resp:
            resp.raise_for_status()
            workers = (await resp.json())["workers"]
        entry = next((w for w in workers if w.get("url") == self.worker_url), None)
        labels = await self.labels()
        body = {"labels": labels, **({"api_key": self._api_key} if self._api_key else {})}
        if entry is None:
            async with http.post(f"{self.gateway_url}/workers", json={"url": self.worker_url, **body}) as resp:
                resp.raise_for_status()
            logger.info("gateway %s: added %s with labels %s", self.gateway_url, self.worker_url, sorted(labels))
            return
        current = entry.get("labels") or {}
        if entry["id"] == self._keyed and all(current.get(k) == v for k, v in labels.items()):
            self.registered.set()
            return
        async with http.patch(f"{self.gateway_url}/workers/{entry['id']}", json=body) as resp:
            resp.raise_for_status()
        self._keyed = entry["id"]
        logger.info(
            "gateway %s: worker %s (%s) given labels %s", self.gateway_url, entry["id"], self.worker_url, sorted(labels)
        )


async def stop(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
