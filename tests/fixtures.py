"""Builders shared by the tests: tiny-model paths, images, tensors and requests."""

import torch

from engine_adapter.families import FAMILIES
from harness.images import image  # noqa: F401  (the tests' images)
from harness.processes import ENGINE_ARGS, MODEL, ROOT, SHAPES_MODEL  # noqa: F401  (the tests' names)
from servicer.tensors import encode_tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

# MODEL: random weights, built on first use: the mechanics tests. SHAPES_MODEL: trained, committed: tests of
# what the model sees. SHIFTED_MODEL: a training step on from it (tinytrain.finetune, committed): refits.
SHIFTED_MODEL = SHAPES_MODEL.parent / "tiny-qwen2-vl-shapes-shifted"
# Random weights per registered family, with video, built by `make model` (tinyvlm.build --all).
FAMILY_MODELS = {f.model_types[0]: ROOT / f.tiny.folder for f in FAMILIES}
assert FAMILY_MODELS["qwen2_vl"] == MODEL, "harness.processes.MODEL is the qwen2_vl family's tiny checkpoint"
# ENGINE_ARGS: CPU-engine flags for the tiny model (float32 for HF parity, a small KV reservation).
# The further families' engines also take video.
FAMILY_ENGINE_ARGS = ENGINE_ARGS[:-1] + ('{"image": 8, "video": 2}',)


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
