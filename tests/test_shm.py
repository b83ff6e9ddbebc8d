"""Shared-memory tensors from a same-host gateway: hostile names, mmap reads, unlink, retries, soak."""

import asyncio
import itertools
import os
import random

import grpc
import pytest
import torch

from servicer.shm import SHM_DIR, ShmError, attach, namespace_id
from tests.conftest import extra_server
from tests.fixtures import image, request, tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

PREFIX = f"vlmtest-{os.getpid()}-"
_names = itertools.count()


def publish(data: bytes, offset: int = 0) -> str:
    """Write a segment as a gateway would (name with our test prefix)."""
    name = f"{PREFIX}{next(_names)}"
    with open(os.path.join(SHM_DIR, name), "wb") as f:
        f.write(b"\0" * offset + data)
    return name


def ours_left() -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)]


def shm_tensor(t: torch.Tensor, **handle) -> pb.TensorData:
    inline = tensor(t)
    name = publish(inline.inline, handle.get("offset", 0))
    h = common_pb2.ShmHandle(name=name, offset=handle.get("offset", 0), nbytes=handle.get("nbytes", len(inline.inline)), owner_id="test")
    return pb.TensorData(shape=list(t.shape), dtype=inline.dtype, shm=h)


# ------------------------------------------------------------------ attach, no engine

@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "..", "x\0y", "", "a" * 300, ".."])
def test_hostile_names_are_refused(name):
    with pytest.raises(ShmError, match="not a plain"):
        attach(name, 0, 1, unlink=False)


def test_symlinks_directories_and_bounds_are_refused(tmp_path):
    target = publish(b"secret")
    link = f"{PREFIX}link"
    os.symlink(os.path.join(SHM_DIR, target), os.path.join(SHM_DIR, link))
    directory = f"{PREFIX}dir"
    os.mkdir(os.path.join(SHM_DIR, directory))
    try:
        with pytest.raises(ShmError, match="cannot be opened"):
            attach(link, 0, 6, unlink=False)
        with pytest.raises(ShmError):
            attach(directory, 0, 1, unlink=False)
        with pytest.raises(ShmError, match="beyond"):
            attach(target, 2, 6, unlink=False)
        assert bytes(attach(target, 2, 4, unlink=True)) == b"cret"
        assert not os.path.exists(os.path.join(SHM_DIR, target))
        with pytest.raises(ShmError) as gone:
            attach(target, 0, 1, unlink=True)
        assert gone.value.missing
    finally:
        os.unlink(os.path.join(SHM_DIR, link))
        os.rmdir(os.path.join(SHM_DIR, directory))


def test_namespace_id_is_boot_id_and_device():
    boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert namespace_id() == f"{boot_id}:{os.stat(SHM_DIR).st_dev}"


# ------------------------------------------------------------------ through the real engine

def _mm(oracle, imgs, pixels: pb.TensorData) -> pb.MultimodalInputs:
    return pb.MultimodalInputs(pixel_values=pixels, model_specific_tensors={"image_grid_thw": tensor(imgs.grid)})


async def _complete(stub, ids, mm, **kw):
    req = request(ids, mm=mm, temperature=0.0, max_tokens=6, ignore_eos=True, **kw)
    [done] = [r.complete async for r in stub.Generate(req) if r.HasField("complete")]
    return list(done.output_ids)


@pytest.mark.engine
async def test_shm_pixels_equal_inline_and_are_unlinked(stub, oracle):
    imgs = oracle.images([image(112, 112, seed=61)])
    ids = oracle.chat_ids("What is in the image?", 1)
    inline = await _complete(stub, ids, _mm(oracle, imgs, tensor(imgs.raw)))
    via_shm = _mm(oracle, imgs, shm_tensor(imgs.raw, offset=4096))
    assert await _complete(stub, ids, via_shm) == inline
    assert ours_left() == []
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.shm_namespace_id == namespace_id() != ""


@pytest.mark.engine
async def test_gateway_retry_of_a_consumed_segment(stub, engine, oracle):
    imgs = oracle.images([image(112, 112, seed=62)])
    ids = oracle.chat_ids("What is in the image?", 1)
    mm = _mm(oracle, imgs, shm_tensor(imgs.pixel_values))
    first = await _complete(stub, ids, mm)
    assert await _complete(stub, ids, mm) == first  # the retry is served from the image store
    async with extra_server(engine, mm_store_gb=0) as (_, no_store):
        mm = _mm(oracle, imgs, shm_tensor(imgs.pixel_values))
        await _complete(no_store, ids, mm)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _complete(no_store, ids, mm)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert mm.pixel_values.shm.name in err.value.details()


@pytest.mark.engine
async def test_malformed_shm_is_refused_and_not_leaked(stub, oracle):
    imgs = oracle.images([image(112, 112, seed=63)])
    ids = oracle.chat_ids("What is in the image?", 1)
    wrong = _mm(oracle, imgs, shm_tensor(imgs.raw, nbytes=imgs.raw.numel() - 1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _complete(stub, ids, wrong)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mm_inputs.pixel_values.shm.nbytes" in err.value.details()
    assert ours_left() == []


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.engine
async def test_soak_2000_shm_requests_leave_nothing_behind(stub, oracle):
    imgs = [oracle.images([image(112, 112, seed=70 + i)]) for i in range(4)]
    ids = oracle.chat_ids("What colour is the shape?", 1)
    rng = random.Random(5)
    outcomes = {"ok": 0, "cancelled": 0, "malformed": 0}

    async def one():
        img = rng.choice(imgs)
        kind = rng.random()
        if kind < 0.05:  # malformed: the handle's nbytes does not match the shape
            mm = _mm(oracle, img, shm_tensor(img.raw, nbytes=img.raw.numel() + 8))
            with pytest.raises(grpc.aio.AioRpcError):
                await _complete(stub, ids, mm)
            outcomes["malformed"] += 1
        elif kind < 0.15:  # cancelled mid-stream
            call = stub.Generate(request(ids, mm=_mm(oracle, img, shm_tensor(img.raw)), stream=True, max_tokens=50, ignore_eos=True))
            await call.read()
            call.cancel()
            outcomes["cancelled"] += 1
        else:
            await _complete(stub, ids, _mm(oracle, img, shm_tensor(img.raw)), stream=rng.random() < 0.5)
            outcomes["ok"] += 1

    async def run(n, concurrency=16):
        sem = asyncio.Semaphore(concurrency)

        async def guarded():
            async with sem:
                await one()
        await asyncio.gather(*(guarded() for _ in range(n)))

    await run(200)  # warm-up: caches, pools and arenas reach their working size
    rss_warm = _rss_kb()
    await run(1800)
    await asyncio.sleep(0.5)
    growth_mb = (_rss_kb() - rss_warm) / 1024
    print(f"soak: {outcomes}, RSS growth after warm-up {growth_mb:.1f} MB")
    assert sum(outcomes.values()) == 2000 and outcomes["cancelled"] and outcomes["malformed"]
    assert ours_left() == []
    assert growth_mb < 64  # ~2000 requests x 75 KB of pixels would be 150 MB if they were kept
