"""Train the tiny Qwen2-VL to answer one-word questions about synthetic shapes.

Starts from build.py's config (vision tower widened) and tokenizer (corpus extended so
every answer is one token), trains on the exact chat prompt the servicer sees:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|>*N<|vision_end|>QUESTION<|im_end|>\\n<|im_start|>assistant\\n
    ANSWER<|im_end|>

with the loss on ANSWER and the closing <|im_end|> only. A share of answers is written the way a
grammar forces them (`{"colour":"red"}`, or a tool call `[{"name":"report_colour","parameters":
{"colour":"red"}}]`), with no loss on the opening bracket: the model never starts JSON on its own,
but once a grammar has started it, it still reads the image and closes the JSON. Writes the checkpoint (float32,
same config/preprocessor extras as build.py), train_log.jsonl and metrics.json (held-out
accuracy and top-1/top-2 logprob gaps on fresh images from another seed) into --out.

    python -m tinyvlm.train --out models/tiny-qwen2-vl-trained [--steps N] [--seed S]
"""

import argparse
import json
import math
import pathlib
import random
import time

import torch
import torch.nn.functional as F
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl import modeling_qwen2_vl

from tinyvlm.build import VOCAB_SIZE, build_config, build_image_processor, write_checkpoint
from tinyvlm.data import ANSWER_WORDS, COLOURS, QUESTIONS, SHAPES, batches, held_out
from tinyvlm.tokenizer import build_tokenizer

RECIPE_VERSION = "qwen2-vl-shapes-2"
SYSTEM_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT_PREFIX = "<|im_end|>\n<|im_start|>assistant\n"
FORMS, FORM_WEIGHTS = ("word", "json", "tool"), (0.8, 0.1, 0.1)  # how training answers are written
GAP = 0.5  # a top-1/top-2 logprob gap below this is a near-tie an engine could flip

# Decoder stays at build.py's shape (head_dim 64 for vLLM's CPU attention); the vision
# tower gets wider and deeper so it can see shape outlines, not just colour.
TEXT_OVERRIDES = dict(intermediate_size=256, initializer_range=0.02)
VISION_OVERRIDES = dict(depth=3, embed_dim=64, num_heads=2, mlp_ratio=4, initializer_range=0.02)


def answer_corpus() -> tuple[str, ...]:
    """Extra tokenizer lines that make each bare answer word (as it follows "assistant\\n") one token."""
    return tuple(f"assistant\n{w}" for w in ANSWER_WORDS) + tuple(ANSWER_WORDS)


class Encoder:
    """Turns (image, question[, answer]) into ids, labels and pixels the way the servicer sees them."""

    def __init__(self, tokenizer, image_processor):
        self.tok, self.proc = tokenizer, image_processor
        tid = tokenizer.convert_tokens_to_ids
        self.pad_id, self.vs, self.ve = tid("<|image_pad|>"), tid("<|vision_start|>"), tid("<|vision_end|>")
        self.im_end, self.fill = tid("<|im_end|>"), tid("<|endoftext|>")
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        self.prefix = enc(SYSTEM_PREFIX)
        self.enc = enc
        self.answer_id = {}
        for w in ANSWER_WORDS:
            ids = enc(w)
            assert len(ids) == 1, f"answer {w!r} is {len(ids)} tokens"
            self.answer_id[w] = ids[0]

    def target(self, answer: str, form: str = "word", kind: str = "colour") -> tuple[list[int], list[int]]:
        """(ids, labels) of the reply: the bare word, or `form` "json" / "tool" around it."""
        if form == "word":
            return [self.answer_id[answer], self.im_end], [self.answer_id[answer], self.im_end]
        head, tail = {"json": (f'{{"{kind}":"', '"}'),
                      "tool": (f'[{{"name":"report_{kind}","parameters":{{"{kind}":"', '"}}]')}[form]
        ids = self.enc(head) + [self.answer_id[answer]] + self.enc(tail) + [self.im_end]
        assert self.enc(head + answer + tail) == ids[:-1], "the answer word is its own token inside JSON"
        return ids, [-100] + ids[1:]  # no loss on the opening bracket

    def batch(self, items, forms=None):
        """items: [(PIL image, question, answer)] -> model kwargs (incl. labels) for one padded batch;
        `forms`: per item, ("word" | "json" | "tool", question kind)."""
        out = self.proc(images=[im for im, _, _ in items], return_tensors="pt")
        grids = out["image_grid_thw"].to(torch.int64)
        seqs, labs = [], []
        for (_, question, answer), grid, form in zip(items, grids, forms or [("word", "")] * len(items)):
            n = int(grid.prod()) // 4
            prompt = self.prefix + [self.vs] + [self.pad_id] * n + [self.ve] + self.enc(question + ASSISTANT_PREFIX)
            ids, labels = self.target(answer, *form)
            seqs.append(prompt + ids)
            labs.append([-100] * len(prompt) + labels)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.fill, dtype=torch.int64)
        labels = torch.full((len(seqs), width), -100, dtype=torch.int64)
        mask = torch.zeros((len(seqs), width), dtype=torch.int64)
        for i, (s, l) in enumerate(zip(seqs, labs)):
            ids[i, :len(s)], labels[i, :len(l)], mask[i, :len(s)] = torch.tensor(s), torch.tensor(l), 1
        return dict(input_ids=ids, attention_mask=mask, labels=labels,
                    pixel_values=out["pixel_values"].to(torch.float32), image_grid_thw=grids,
                    mm_token_type_ids=(ids == self.pad_id).to(torch.int64))


def _equal_length_vision_attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """VisionAttention.forward for a batch of same-size images: one SDPA call over
    [images, heads, patches, dim] instead of a Python loop over images. Same maths."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if not bool((lengths == lengths[0]).all()):
        return _ORIGINAL_VISION_ATTENTION(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    seq, n, per = hidden_states.shape[0], lengths.numel(), int(lengths[0])
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = modeling_qwen2_vl.apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(n, per, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq, -1))


_ORIGINAL_VISION_ATTENTION = modeling_qwen2_vl.VisionAttention.forward


def answer_logprobs(model, batch):
    """[B, 2, vocab] logprobs at the two supervised positions (answer word, closing <|im_end|>)."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    labels = batch["labels"]
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**kwargs).logits  # [B, T, V]
    pos = (labels[:, 1:] != -100).nonzero()  # the logits at t predict the token at t+1
    lp = torch.log_softmax(logits[pos[:, 0], pos[:, 1]].float(), dim=-1)
    return lp.view(labels.shape[0], 2, -1), labels[:, 1:][labels[:, 1:] != -100].view(-1, 2)


@torch.no_grad()
def evaluate(model, encoder, seed: int, n_images: int, batch_size: int = 50) -> dict:
    """Fresh images from `seed`, each asked its colour and its shape. Exact answer = the
    greedy answer word, then <|im_end|>; the gap is top-1 minus top-2 logprob at both."""
    model.eval()
    items = held_out(seed, n_images)
    stats = {kind: {"correct": 0, "total": 0, "gaps": []} for kind in QUESTIONS}
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        lp, target = answer_logprobs(model, encoder.batch([(s.image, question, answer) for s, _, question, answer in chunk]))
        top = lp.topk(2, dim=-1)
        exact = (top.indices[..., 0] == target).all(-1)
        gaps = top.values[..., 0] - top.values[..., 1]
        for (_, kind, _, _), ok, g in zip(chunk, exact.tolist(), gaps.tolist()):
            stats[kind]["correct"] += ok
            stats[kind]["total"] += 1
            stats[kind]["gaps"] += g
    result = {"eval_seed": seed, "images_per_question": n_images, "accuracy": {}, "gap_fraction": {}, "min_gap": {}}
    for kind, st in stats.items():
        result["accuracy"][kind] = st["correct"] / st["total"]
        result["gap_fraction"][kind] = sum(g >= GAP for g in st["gaps"]) / len(st["gaps"])
        result["min_gap"][kind] = min(st["gaps"])
    every = [g for st in stats.values() for g in st["gaps"]]
    result["gap_fraction"]["all"] = sum(g >= GAP for g in every) / len(every)
    result["gap_threshold"] = GAP
    return result


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class VisionProbe(torch.nn.Module):
    """Training-only auxiliary head: a linear read of colour and shape from each image's
    mean merged vision token. It hands the vision tower a direct gradient (the answer loss
    reaches it only through the decoder's attention, which is slow to teach it shapes); it is
    not part of the checkpoint."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, len(COLOURS) + len(SHAPES))

    def loss(self, merged: torch.Tensor, grids: torch.Tensor, samples) -> torch.Tensor:
        per_image = torch.stack([t.mean(0) for t in merged.split((grids.prod(-1) // 4).tolist())])
        logits = self.linear(per_image).split([len(COLOURS), len(SHAPES)], dim=-1)
        targets = [torch.tensor(t) for t in zip(*[(list(COLOURS).index(s.colour), SHAPES.index(s.shape))
                                                 for s in samples])]
        return sum(F.cross_entropy(lg, t) for lg, t in zip(logits, targets))


def train(out: pathlib.Path, steps: int, seed: int, batch_size: int, lr: float, eval_images: int,
          aux_weight: float = 1.0, log_every: int = 10) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    start = time.time()
    tokenizer = build_tokenizer(VOCAB_SIZE, extra_corpus=answer_corpus())
    config = build_config(tokenizer, text=TEXT_OVERRIDES, vision=VISION_OVERRIDES)
    image_processor = build_image_processor()
    encoder = Encoder(tokenizer, image_processor)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    modeling_qwen2_vl.VisionAttention.forward = _equal_length_vision_attention  # training speed only
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters; {steps} steps of {batch_size}", flush=True)

    probe = VisionProbe(config.vision_config.hidden_size)
    merged = {}
    model.model.visual.register_forward_hook(lambda _m, _i, o: merged.__setitem__("out", o.pooler_output))
    named = list(model.named_parameters()) + list(probe.named_parameters(prefix="probe"))
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    stream = batches(seed, batch_size)
    form_rng = random.Random(seed + 1)  # its own stream: the images do not depend on the forms
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.jsonl").open("w")
    model.train()
    running, running_aux, seen = 0.0, 0.0, 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        qa = next(stream)
        forms = [(form_rng.choices(FORMS, weights=FORM_WEIGHTS)[0], kind) for _, kind, _, _ in qa]
        batch = encoder.batch([(s.image, question, answer) for s, _, question, answer in qa], forms)
        loss = model(**batch).loss
        aux = probe.loss(merged["out"], batch["image_grid_thw"], [s for s, *_ in qa])
        opt.zero_grad(set_to_none=True)
        (loss + aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        running, running_aux, seen = running + loss.item(), running_aux + aux.item(), seen + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rec = {"step": step + 1, "loss": round(running / seen, 5), "probe_loss": round(running_aux / seen, 5),
                   "lr": round(opt.param_groups[0]["lr"], 6), "elapsed": round(time.time() - start, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if (step + 1) % (log_every * 10) == 0 or step + 1 == steps:
                print(json.dumps(rec), flush=True)
            running, running_aux, seen = 0.0, 0.0, 0
    log.close()
    train_seconds = time.time() - start

    modeling_qwen2_vl.VisionAttention.forward = _ORIGINAL_VISION_ATTENTION  # evaluate with stock HF
    model.eval()
    write_checkpoint(out, model, tokenizer, image_processor, RECIPE_VERSION)
    metrics = evaluate(model, encoder, seed=seed + 1_000_003, n_images=eval_images)
    metrics.update(
        train_seed=seed, steps=steps, batch_size=batch_size, peak_lr=lr, aux_weight=aux_weight, parameters=n_params,
        train_seconds=round(train_seconds, 1), total_seconds=round(time.time() - start, 1),
        checkpoint_bytes=sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models/tiny-qwen2-vl-trained"))
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the training-only vision probe loss")
    args = parser.parse_args()
    metrics = train(args.out, args.steps, args.seed, args.batch_size, args.lr, args.eval_images, args.aux_weight)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
