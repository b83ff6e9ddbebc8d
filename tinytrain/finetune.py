"""A "training step" for RL demonstrations: a few optimizer steps from a checkpoint, every parameter (vision
tower included), on a changed answer mapping, so the new weights visibly answer differently.

The mapping shifts each answer to the next word of its list (red -> green, ..., circle -> square, ...), or
back (`shift=-1`); the data, the prompt and the loss are tinytrain.train's. Deterministic for a seed.

    python -m tinytrain.finetune --src models/tiny-qwen2-vl-shapes --out models/tiny-qwen2-vl-shapes-shifted
"""

import argparse
import json
import pathlib
import random
import time

import torch
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

from tinytrain.data import COLOURS, SHAPES, batches, held_out
from tinytrain.train import Encoder, answer_loss, score, training_kernels

RECIPE_VERSION = "qwen2-vl-shapes-shifted-1"


def shifted(shift: int) -> dict[str, str]:
    """Each colour and shape answer moved `shift` places along its own list."""
    mapping = {}
    for words in (list(COLOURS), SHAPES):
        mapping |= {w: words[(i + shift) % len(words)] for i, w in enumerate(words)}
    return mapping


def finetune(src: pathlib.Path, out: pathlib.Path, steps: int = 60, shift: int = 1, seed: int = 7,
             lr: float = 2e-3, batch_size: int = 16, eval_images: int = 50, log=print) -> dict:
    """Train `steps` steps from `src` towards the shifted answers; write the checkpoint to `out` (same files,
    same config) and return held-out accuracy against the shifted answers."""
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(src)
    processor = AutoImageProcessor.from_pretrained(src)
    model = Qwen2VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    encoder = Encoder(tokenizer, processor)
    mapping = shifted(shift)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = batches(seed, batch_size)
    with training_kernels():
        model.train()
        for step in range(steps):
            qa = next(data)
            batch = encoder.batch([(s.image, question, mapping[answer]) for s, _, question, answer in qa], fast=True)
            loss = answer_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % 10 == 0 or step + 1 == steps:
                log(json.dumps({"step": step + 1, "loss": round(loss.item(), 4), "elapsed": round(time.time() - started, 1)}))
    model.eval()
    _save_like(src, out, model)
    items = [(s, kind, question, mapping[answer]) for s, kind, question, answer in held_out(seed + 1, eval_images)]
    metrics = {"accuracy_on_shifted_answers": score(model, encoder, items)["accuracy"], "steps": steps,
               "shift": shift, "seed": seed, "lr": lr, "batch_size": batch_size, "source": str(src),
               "seconds": round(time.time() - started, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _save_like(src: pathlib.Path, out: pathlib.Path, model) -> None:
    """The new weights beside copies of `src`'s other files, so the checkpoint differs in weights alone."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("metrics.json", "train_log.jsonl",
                                                                         "RECIPE"):
            (out / f.name).write_bytes(f.read_bytes())
    (out / "RECIPE").write_text(RECIPE_VERSION + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=pathlib.Path, default=pathlib.Path("models/tiny-qwen2-vl-shapes"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models/tiny-qwen2-vl-shapes-shifted"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--shift", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    random.seed(args.seed)
    print(json.dumps(finetune(args.src, args.out, args.steps, args.shift, args.seed, args.lr), indent=2))


if __name__ == "__main__":
    main()
