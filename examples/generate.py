"""Call a running vlm-servicer the way a gateway does: token ids + precomputed pixels.

    .venv/bin/python examples/generate.py [--image PATH] [--question TEXT] [--port 50051]

Tokenizes with the model's chat template and preprocesses the image with its
image processor (the gateway's half of the work), sends one Generate, prints the
returned token ids and their decoding.
"""

import argparse

import grpc
import numpy as np
from PIL import Image, ImageDraw
from transformers import AutoProcessor

from servicer.tensors import encode_tensor
from vlm_proto import vllm_engine_pb2 as pb, vllm_engine_pb2_grpc as pb_grpc


def demo_image() -> Image.Image:
    """A blue triangle on a grey background, 56x56 (4 image tokens), like the tiny model's training images."""
    img = Image.new("RGB", (56, 56), (140, 140, 130))
    ImageDraw.Draw(img).polygon([(28, 8), (48, 44), (8, 44)], fill=(30, 70, 230))
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-qwen2-vl-shapes", help="for its tokenizer and image processor")
    parser.add_argument("--image", help="image file (default: a generated blue triangle)")
    parser.add_argument("--question", default="What colour is the shape?")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    processor = AutoProcessor.from_pretrained(args.model)
    tok = processor.tokenizer
    image = Image.open(args.image).convert("RGB") if args.image else demo_image()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # One <|image_pad|> per image: the servicer expands it to the grid's token count.
    ids = tok.encode(text.replace("<image>", "<|image_pad|>"), add_special_tokens=False)
    # Raw uint8 patches: the servicer advertises mm_device_do_normalize.
    feats = processor.image_processor(images=[image], return_tensors="np", do_rescale=False, do_normalize=False)
    pixels = feats["pixel_values"].astype(np.uint8)
    grid = feats["image_grid_thw"].astype("<i8")
    mm = pb.MultimodalInputs(
        pixel_values=encode_tensor(pixels), model_specific_tensors={"image_grid_thw": encode_tensor(grid)},
    )
    request = pb.GenerateRequest(
        request_id="example-1",
        tokenized=pb.TokenizedInput(original_text=text, input_ids=ids),
        mm_inputs=mm,
        sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
    )
    with grpc.insecure_channel(f"{args.host}:{args.port}") as channel:
        for response in pb_grpc.VllmEngineStub(channel).Generate(request):
            done = response.complete
    print(f"prompt_tokens={done.prompt_tokens} completion_tokens={done.completion_tokens} finish={done.finish_reason}")
    print("output_ids:", list(done.output_ids))
    print("text:", repr(tok.decode(done.output_ids, skip_special_tokens=True)))


if __name__ == "__main__":
    main()
