"""`TensorData` (little-endian bytes + shape + dtype) to torch tensors and back.

One allow-list of dtypes, an exact byte-length check, and no copy: the tensor
views the message's bytes (inline) or the gateway's shared-memory segment (shm)
until the single cast to the model dtype. `encode_tensor` is the client side
(tests, benchmarks, examples).
"""

import math
import warnings

import numpy as np
import torch

from servicer.errors import FailedPrecondition, InvalidArgument
from servicer.shm import ShmError, attach
from vlm_proto import vllm_engine_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "uint32": torch.uint32,
}


# torch.frombuffer warns on read-only buffers; our views are never written to. (Filtered once: a
# catch_warnings block per call cost more than decoding a small tensor.)
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class SegmentGone(FailedPrecondition):
    """The named shared-memory segment no longer exists (e.g. a gateway retry after we consumed it)."""

    def __init__(self, field: str, name: str):
        super().__init__(
            f"{field}.shm: segment {name!r} no longer exists (consumed by an earlier attempt?); resend the tensor",
            metadata=(("vlm-missing-shm-segments", name),),
        )
        self.name = name


def encode_tensor(t: torch.Tensor | np.ndarray, dtype: str | None = None) -> pb.TensorData:
    """Inline TensorData of a tensor or array; `dtype` overrides the name (bfloat16 is sent as its raw bits)."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    t = t.contiguous()
    name = dtype or str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not on the wire (allowed: {', '.join(DTYPES)})")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return pb.TensorData(shape=list(t.shape), dtype=name, inline=raw.numpy().tobytes())


def payload_nbytes(tensor: pb.TensorData) -> int:
    """The payload's size from its shape and dtype, for a tensor `decode_tensor` accepted (reading an inline
    payload to measure it would copy it: protobuf makes a new bytes object per access)."""
    return math.prod(tensor.shape) * DTYPES[tensor.dtype].itemsize


def decode_tensor(field: str, tensor: pb.TensorData, unlink_shm: bool = True) -> torch.Tensor:
    """Return a read-only view of the tensor's bytes; `field` names it in errors."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{field}.dtype: unsupported dtype {tensor.dtype!r} (allowed: {', '.join(DTYPES)})")
    shape = tuple(tensor.shape)
    if not shape:
        raise InvalidArgument(f"{field}.shape: must have at least one dimension")
    payload = tensor.WhichOneof("payload")
    expected = payload_nbytes(tensor)
    data: bytes | memoryview
    if payload == "inline":
        data = tensor.inline
        if len(data) != expected:
            raise InvalidArgument(
                f"{field}: {len(data)} bytes but shape {list(shape)} of {tensor.dtype} needs {expected}"
            )
    elif payload == "shm":
        handle = tensor.shm
        try:  # attach (and so unlink) before any other check: a refused request leaks no segment
            data = attach(handle.name, handle.offset, handle.nbytes, unlink_shm)
        except ShmError as exc:
            if exc.missing:
                raise SegmentGone(field, handle.name) from None
            raise InvalidArgument(f"{field}.shm: {exc}") from None
        if handle.nbytes != expected:
            raise InvalidArgument(
                f"{field}.shm.nbytes: {handle.nbytes} but shape {list(shape)} of {tensor.dtype} needs {expected}"
            )
    elif payload is None:
        raise InvalidArgument(f"{field}: no payload (set inline bytes or a shm handle)")
    else:
        raise InvalidArgument(f"{field}.{payload}: not supported; send inline bytes or a shm handle")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).view(shape)
