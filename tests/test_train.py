"""The training script runs end to end (a few steps of each stage), writing a checkpoint HF loads, its log and metrics.

The committed checkpoint's accuracy is measured through the engine in test_sees.py; this keeps the
script that produced it working.
"""

import json
import random

import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl import modeling_qwen2_vl

from tinytrain import data
from tinyvlm.build import VOCAB_SIZE, build_config, build_image_processor
from tinyvlm.tokenizer import build_tokenizer
from tinytrain.train import (TEXT_OVERRIDES, VISION_OVERRIDES, Encoder, answer_corpus, answer_loss, in_background, patchify,
                           train, training_kernels)


def test_a_few_steps_write_checkpoint_log_and_metrics(tmp_path):
    metrics = train(tmp_path, steps=3, seed=0, batch_size=4, lr=1e-3, eval_images=3, log_every=1,
                    vision_steps=2, vision_batch_size=4)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    vision = [r for r in log if r.get("stage") == "vision"]
    assert [r["step"] for r in vision] == [1, 2] and all(r["probe_loss"] > 0 for r in vision)
    assert [r["step"] for r in log if r not in vision] == [1, 2, 3] and all(r["loss"] > 0 for r in log if r not in vision)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert set(metrics["accuracy"]) == set(data.QUESTIONS)
    Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    tokenizer = AutoProcessor.from_pretrained(tmp_path).tokenizer
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in data.ANSWER_WORDS)


def test_patchify_is_the_image_processors_output():
    """Training's one-pass pixels equal the processor's (the servicer's input) for every training size."""
    processor = build_image_processor()
    for size in data.SIZES:
        images = [data.make_sample(random.Random(seed), size=size).image for seed in range(3)]
        ref = processor(images=images, return_tensors="pt")
        pixel_values, grids = patchify(images, processor)
        assert torch.equal(grids, ref["image_grid_thw"].to(torch.int64))
        torch.testing.assert_close(pixel_values, ref["pixel_values"].to(torch.float32), rtol=0, atol=1e-6)


def test_answer_loss_is_the_models_own_loss():
    """Projecting only the labelled positions changes no number: HF's full-logits loss is the same."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(VOCAB_SIZE, extra_corpus=answer_corpus())
    model = Qwen2VLForConditionalGeneration(build_config(tokenizer, text=TEXT_OVERRIDES, vision=VISION_OVERRIDES))
    encoder = Encoder(tokenizer, build_image_processor())
    qa = next(data.batches(0, 4))
    batch = encoder.batch([(s.image, q, a) for s, _, q, a in qa], [("json", k) for _, k, _, _ in qa], fast=True)
    torch.testing.assert_close(answer_loss(model, batch), model(**batch).loss)


def test_training_kernels_are_the_stock_tower():
    """Training's faster attention, patch embedding and position ids give the stock tower's output and gradients,
    for a batch of one size and (falling back to stock) of mixed sizes; stock code is back afterwards."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(VOCAB_SIZE, extra_corpus=answer_corpus())
    tower = Qwen2VLForConditionalGeneration(build_config(tokenizer, text=TEXT_OVERRIDES, vision=VISION_OVERRIDES)).model.visual
    processor = build_image_processor()
    swapped = ((modeling_qwen2_vl.VisionAttention, "forward"), (modeling_qwen2_vl.PatchEmbed, "forward"),
               (modeling_qwen2_vl, "get_vision_position_ids"))
    stock = [getattr(*key) for key in swapped]

    def run(images):
        out = processor(images=images, return_tensors="pt")
        tower.zero_grad()
        merged = tower(out["pixel_values"].float(), grid_thw=out["image_grid_thw"]).pooler_output
        merged.square().sum().backward()
        return merged.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()}

    for sizes in ([(84, 56)] * 3, [(56, 56), (56, 84), (84, 56)]):
        images = [data.make_sample(random.Random(seed), size=size).image for seed, size in enumerate(sizes)]
        want, want_grads = run(images)
        with training_kernels():
            got, got_grads = run(images)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert [getattr(*key) for key in swapped] == stock


def test_background_stream_is_the_same_stream():
    """The worker process yields what the generator yields in this process, in order."""
    make = lambda: ((torch.tensor([i]), {"n": torch.tensor(i * i)}) for i in range(12))  # noqa: E731
    stream = in_background(make)
    for want in make():
        got = next(stream)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1]["n"], want[1]["n"])
