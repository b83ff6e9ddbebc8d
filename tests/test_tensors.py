"""TensorData decoding: dtype allow-list, exact byte lengths, zero-copy views."""

import pytest
import torch

from servicer.errors import InvalidArgument
from servicer.tensors import decode_tensor
from servicer.tensors import encode_tensor as tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_each_dtype(dtype):
    t = (torch.arange(24).reshape(2, 3, 4) % 7).to(dtype)
    assert torch.equal(decode_tensor("x", tensor(t)), t)


def test_byte_length_must_match_shape():
    bad = pb.TensorData(shape=[2, 3], dtype="float32", inline=b"\0" * 20)
    with pytest.raises(InvalidArgument, match=r"x: 20 bytes but shape \[2, 3\] of float32 needs 24"):
        decode_tensor("x", bad)


def test_unknown_dtype_and_missing_payload_are_named():
    with pytest.raises(InvalidArgument, match="x.dtype: unsupported dtype 'complex64'"):
        decode_tensor("x", pb.TensorData(shape=[1], dtype="complex64", inline=b"\0" * 8))
    with pytest.raises(InvalidArgument, match="x: no payload"):
        decode_tensor("x", pb.TensorData(shape=[1], dtype="uint8"))
    remote = pb.TensorData(shape=[1], dtype="uint8", remote=common_pb2.RemoteTensorHandle(transport="nixl"))
    with pytest.raises(InvalidArgument, match="x.remote: not supported"):
        decode_tensor("x", remote)
