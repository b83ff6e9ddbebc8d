"""The training script runs end to end (a few steps), writing a checkpoint HF loads, its log and metrics.

The committed checkpoint's accuracy is measured through the engine in test_sees.py; this keeps the
script that produced it working.
"""

import json

from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from tinyvlm import data
from tinyvlm.train import train


def test_a_few_steps_write_checkpoint_log_and_metrics(tmp_path):
    metrics = train(tmp_path, steps=3, seed=0, batch_size=4, lr=1e-3, eval_images=3, log_every=1)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert set(metrics["accuracy"]) == set(data.QUESTIONS)
    Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    tokenizer = AutoProcessor.from_pretrained(tmp_path).tokenizer
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in data.ANSWER_WORDS)
