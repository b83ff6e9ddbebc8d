"""Accuracy of a shapes checkpoint in HF transformers, on both renderers: the training generator's
held-out images and the second renderer's (tests/second_renderer.py), each asked its colour and shape.

    PYTHONPATH=. .venv/bin/python scripts/eval_shapes.py models/tiny-qwen2-vl-shapes [--images 1000]

Seeds are the tests' own (tests/test_sees.py) plus fresh ones; test_sees measures the same through gRPC.
"""

import argparse
import json

import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from tests import second_renderer
from tinytrain import data
from tinytrain.train import Encoder, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=200, help="images per seed")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.checkpoint).to(torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    encoder = Encoder(processor.tokenizer, processor.image_processor)
    result = {}
    for seed in (20261123, 4242):
        result[f"training generator, seed {seed}"] = score(model, encoder, data.held_out(seed, args.images))["accuracy"]
    for seed in (777001, 4243, 5):
        result[f"second renderer, seed {seed}"] = score(model, encoder, second_renderer.held_out(seed, args.images))["accuracy"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
