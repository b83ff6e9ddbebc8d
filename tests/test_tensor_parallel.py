"""Tensor parallelism on the CPU engine (2 ranks): images published once per identity in vLLM's
shared-memory object store, mapped by both ranks; outputs equal Hugging Face's; the ring is
bounded by --mm-shm-gb (INVALID_ARGUMENT for images that can never fit, the engine keeps serving);
rings of dead servicers swept at start."""

import asyncio
import os

import grpc
import pytest

from engine_adapter.shm_ring import SHM_DIR, ring_name
from tests.fixtures import image, mm_inputs, request
from tests.test_lifecycle import servicer_process  # noqa: F401  (fixture)
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine
DEAD_PID = 4_000_000  # above any pid this kernel hands out (pid_max is at most 4194304)


async def test_two_ranks_share_images_published_once(servicer_process, oracle):  # noqa: F811
    stale = os.path.join(SHM_DIR, ring_name(DEAD_PID))
    open(stale, "wb").close()
    proc = await asyncio.to_thread(
        servicer_process, "--tensor-parallel-size", "2", "--mm-processor-cache-type", "shm",
        "--mm-shm-gb", "0.001",  # 1 MiB: two 112x112 uint8 images fit, one 336x336 in float32 (2.7 MB) does not
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},  # one core per rank on this 2-core machine
    )
    assert not os.path.exists(stale), "the dead servicer's ring was not swept"
    ring = os.path.join(SHM_DIR, ring_name(proc.proc.pid))
    assert os.path.exists(ring), proc.tail()
    a, b = oracle.images([image(112, 112, seed=81)]), oracle.images([image(112, 112, seed=82)])
    big = oracle.images([image(336, 336, seed=83)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
        stub = pb_grpc.VllmEngineStub(channel)
        ids = oracle.chat_ids("Describe the image.", 1, big.tokens_per_image)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [r async for r in stub.Generate(request(ids, mm=mm_inputs(big.pixel_values, big.grid), max_tokens=1))]
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--mm-shm-gb" in refused.value.details()
        for imgs in (a, b, a):
            ids = oracle.chat_ids("Describe the image.", 1, imgs.tokens_per_image)
            req = request(ids, mm=mm_inputs(imgs.raw, imgs.grid), temperature=0.0, max_tokens=8, ignore_eos=True)
            [done] = [r.complete async for r in stub.Generate(req)]
            assert list(done.output_ids) == oracle.greedy(ids, imgs, 8)[0]
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert (info.mm_items_published, info.mm_items_reused) == (2, 1)
    proc.proc.terminate()
    assert await asyncio.to_thread(proc.proc.wait, 120) == 0
    assert not os.path.exists(ring), "the ring outlived its servicer"
