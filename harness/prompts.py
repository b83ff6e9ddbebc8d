"""Requests in the trained tiny model's own format (tinytrain.train's prompt), as a gateway sends them: prompt ids
with the image's pads expanded, and raw uint8 patches (the servicer advertises mm_device_do_normalize)."""

import torch

from servicer.tensors import encode_tensor
from tinytrain import data
from vlm_proto import vllm_engine_pb2 as pb

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


def shapes_prompt(processor, image, question: str) -> tuple[list[int], pb.MultimodalInputs]:
    """(prompt ids, multimodal inputs) asking `question` about `image`; `processor`: the checkpoint's AutoProcessor."""
    proc, tok = processor.image_processor, processor.tokenizer
    raw = proc(images=[image], return_tensors="pt", do_rescale=False, do_normalize=False)
    grid = raw["image_grid_thw"].to(torch.int64)
    tid = tok.convert_tokens_to_ids
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    pads = [tid("<|image_pad|>")] * (int(grid.prod()) // proc.merge_size ** 2)
    ids = enc(SYSTEM) + [tid("<|vision_start|>"), *pads, tid("<|vision_end|>")] + enc(question + ASSISTANT)
    mm = pb.MultimodalInputs(pixel_values=encode_tensor(raw["pixel_values"].round().to(torch.uint8)),
                             model_specific_tensors={"image_grid_thw": encode_tensor(grid)})
    return ids, mm


def shapes_question(processor, sample: data.Sample, kind: str, **sampling) -> pb.GenerateRequest:
    """A GenerateRequest asking the sample's colour or shape (`kind`)."""
    ids, mm = shapes_prompt(processor, sample.image, data.QUESTIONS[kind])
    return pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=ids), mm_inputs=mm,
                              sampling_params=pb.SamplingParams(**sampling))
