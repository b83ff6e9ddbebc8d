"""Builders shared by the tests: tiny-model paths, images, tensors and requests."""

import pathlib

import numpy as np
import torch
from PIL import Image

from engine_adapter.families import FAMILIES
from servicer.tensors import encode_tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Random weights per registered family, with video, built by `make model` (tinyvlm.build --all).
FAMILY_MODELS = {f.model_types[0]: ROOT / f.tiny.folder for f in FAMILIES}
MODEL = FAMILY_MODELS["qwen2_vl"]  # the mechanics tests' model
SHAPES_MODEL = ROOT / "models" / "tiny-qwen2-vl-shapes"  # trained, committed: tests of what the model sees
# CPU-engine flags for the tiny model: float32 for HF parity, a small KV reservation.
ENGINE_ARGS = (
    "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
    "--kv-cache-memory-bytes", str(1 << 30), "--limit-mm-per-prompt", '{"image": 8, "video": 0}',
)
# The further families' engines also take video.
FAMILY_ENGINE_ARGS = ENGINE_ARGS[:-1] + ('{"image": 8, "video": 2}',)


def image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic noise-and-gradient RGB image."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.randint(0, 64, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


tensor = encode_tensor  # the tests' short name for the one encoder


def mm_inputs(pixel_values: torch.Tensor, grid: torch.Tensor, **extra) -> pb.MultimodalInputs:
    return pb.MultimodalInputs(
        pixel_values=tensor(pixel_values),
        model_specific_tensors={"image_grid_thw": tensor(grid.to(torch.int64))},
        **extra,
    )


def reference_inputs(grid: torch.Tensor, hashes: list[str]) -> pb.MultimodalInputs:
    """SMG's pixel-less image batch: identities and grids, no pixel_values."""
    return pb.MultimodalInputs(model_specific_tensors={"image_grid_thw": tensor(grid)}, mm_hashes=hashes)


def video_inputs(videos, **extra) -> pb.MultimodalInputs:
    """A VIDEO batch as SMG sends it: float patches named pixel_values, grid, seconds per grid, flat sizes."""
    return pb.MultimodalInputs(
        modality=common_pb2.VIDEO,
        pixel_values=tensor(videos.pixel_values),
        model_specific_tensors={"video_grid_thw": tensor(videos.grid), "video_second_per_grid": tensor(videos.seconds_per_grid),
                                "patches_per_video": tensor(videos.grid.prod(-1))},
        flat_keys={"pixel_values": "patches_per_video"},
        batched_keys=["video_grid_thw", "video_second_per_grid", "patches_per_video"],
        keep_on_cpu_keys=["video_grid_thw"],
        **extra,
    )


def request(ids, request_id: str = "", mm=None, stream: bool = False, extra=(), **sampling) -> pb.GenerateRequest:
    """A GenerateRequest; `mm` is the first multimodal batch, `extra` the further ones (extra_mm_inputs)."""
    req = pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=list(ids)),
        sampling_params=pb.SamplingParams(**sampling),
        stream=stream,
        extra_mm_inputs=list(extra),
    )
    if mm is not None:
        req.mm_inputs.CopyFrom(mm)
    return req
