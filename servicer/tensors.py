"""Decode `TensorData` (little-endian bytes + shape + dtype) into torch tensors.

One allow-list of dtypes, an exact byte-length check, and no copy: the tensor
views the message's bytes until the single cast to the model dtype.
"""

import math
import warnings

import torch

from servicer.errors import InvalidArgument
from vlm_proto import vllm_engine_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "uint32": torch.uint32,
}


def decode_tensor(field: str, tensor: pb.TensorData) -> torch.Tensor:
    """Return a read-only view of the tensor's inline bytes; `field` names it in errors."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{field}.dtype: unsupported dtype {tensor.dtype!r} (allowed: {', '.join(DTYPES)})")
    shape = tuple(tensor.shape)
    if not shape:
        raise InvalidArgument(f"{field}.shape: must have at least one dimension")
    payload = tensor.WhichOneof("payload")
    if payload != "inline":
        if payload is None:
            raise InvalidArgument(f"{field}: no payload (set inline bytes)")
        raise InvalidArgument(f"{field}.{payload}: not supported; send the tensor as inline bytes")
    data = tensor.inline
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}: {len(data)} bytes but shape {list(shape)} of {tensor.dtype} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # frombuffer warns on read-only buffers; the view is never written to.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).view(shape)
