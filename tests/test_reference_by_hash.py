"""Reference by hash: an image sent as identity + grid, resolved from the servicer's image store."""

import grpc
import pytest
import torch

from tests.fixtures import image, mm_inputs, reference_inputs, request, tensor
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine


async def _generate(stub, ids, mm):
    call = stub.Generate(request(ids, mm=mm, temperature=0.0, max_tokens=8, ignore_eos=True))
    metadata = dict(await call.initial_metadata())
    [done] = [r.complete async for r in call]
    return done, metadata


async def test_reference_is_served_like_the_pixels(stub, server, oracle):
    imgs = oracle.images([image(112, 112, seed=31)])
    ids = oracle.chat_ids("What is in the image?", 1)
    with_pixels, metadata = await _generate(stub, ids, mm_inputs(imgs.raw, imgs.grid))
    identity = metadata["vlm-mm-identities"]
    before = server.servicer.image_store.stats().hits
    by_hash, _ = await _generate(stub, ids, reference_inputs(imgs.grid, [identity]))
    assert by_hash.output_ids == with_pixels.output_ids
    assert list(by_hash.output_ids) == oracle.greedy(oracle.chat_ids("What is in the image?", 1, imgs.tokens_per_image), imgs, 8)[0]
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.mm_store_hits == before + 1 and info.mm_store_items >= 1 and info.mm_store_bytes > 0


async def test_mixed_batch_of_reference_and_new_pixels(stub, oracle):
    first, second = oracle.images([image(112, 112, seed=32)]), oracle.images([image(56, 140, seed=33)])
    ids = oracle.chat_ids("Describe the image.", 2)
    _, metadata = await _generate(stub, oracle.chat_ids("Describe the image.", 1), mm_inputs(first.pixel_values, first.grid))
    both = oracle.images([image(112, 112, seed=32), image(56, 140, seed=33)])
    grid = both.grid
    mm = mm_inputs(second.pixel_values, grid, mm_hashes=[metadata["vlm-mm-identities"], ""],
                   flat_keys={"pixel_values": "patches_per_image"}, batched_keys=["image_grid_thw", "patches_per_image"])
    mm.model_specific_tensors["patches_per_image"].CopyFrom(tensor(torch.tensor([0, int(grid[1].prod())])))
    mixed, _ = await _generate(stub, ids, mm)
    full, _ = await _generate(stub, ids, mm_inputs(both.pixel_values, grid))
    assert mixed.output_ids == full.output_ids


async def test_unknown_reference_is_failed_precondition_listing_it(stub, oracle):
    imgs = oracle.images([image(112, 112, seed=34)])
    ids = oracle.chat_ids("What is in the image?", 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(stub, ids, reference_inputs(imgs.grid, ["f" * 32]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "f" * 32 in err.value.details()
    assert dict(err.value.trailing_metadata())["vlm-missing-mm-hashes"] == "f" * 32


async def test_gateway_hash_references_need_trust(stub, trust_stub, oracle):
    """Under recompute only our computed identity names a stored image; under trust the gateway's does."""
    imgs = oracle.images([image(112, 112, seed=35)])
    ids = oracle.chat_ids("What is in the image?", 1)
    gateway_hash = "ab" * 32
    for target in (stub, trust_stub):
        await _generate(target, ids, mm_inputs(imgs.raw, imgs.grid, mm_hashes=[gateway_hash]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _generate(stub, ids, reference_inputs(imgs.grid, [gateway_hash]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    trusted, _ = await _generate(trust_stub, ids, reference_inputs(imgs.grid, [gateway_hash]))
    assert len(trusted.output_ids) == 8
