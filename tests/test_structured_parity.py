"""Constrained greedy output through our gRPC path equals vLLM's own offline `LLM.generate` with the same
structured-output parameters on the same ids and image (a reference independent of our request path)."""

import asyncio
import json
import subprocess
import sys

import pytest

from tests.conftest import COMPACT_JSON
from tests.fixtures import ROOT, SHAPES_MODEL, mm_inputs, request
from tinytrain import data
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine

SEED, IMAGES, MAX_TOKENS = 777, 3, 24
COLOURS = list(data.COLOURS)
CONSTRAINTS = [  # (wire field, value; vLLM's StructuredOutputsParams keyword, value)
    ("json_schema", json.dumps({"type": "object", "properties": {"colour": {"enum": COLOURS}}, "required": ["colour"]}), "json"),
    ("regex", "(red|green|blue|yellow|purple|orange|white|black)!?", "regex"),
    ("choice", COLOURS, "choice"),
    ("grammar", 'root ::= "It is " ("red" | "blue" | "green" | "white")', "grammar"),
]


def _offline(cases: list[dict], out) -> list[list[int]]:
    spec = {"model": str(SHAPES_MODEL), "seed": SEED, "images": IMAGES, "max_tokens": MAX_TOKENS,
            "structured_outputs_config": COMPACT_JSON, "cases": cases}
    done = subprocess.run([sys.executable, "-m", "tests.offline_vllm", str(out)], input=json.dumps(spec),
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


async def test_constrained_greedy_equals_vllm_offline(shapes_stub, shapes_oracle, tmp_path):
    samples = [s for s, kind, _, _ in data.held_out(SEED, IMAGES) if kind == "colour"]
    ids = shapes_oracle.chat_ids("What colour is the shape?", 1)  # one placeholder: each side expands it
    cases, ours = [], []
    for i, sample in enumerate(samples):
        imgs = shapes_oracle.images([sample.image])
        for wire, value, keyword in CONSTRAINTS:
            constraint = {wire: pb.ChoiceConstraint(choices=value) if wire == "choice" else value}
            [done] = [r.complete async for r in shapes_stub.Generate(request(
                ids, mm=mm_inputs(imgs.raw, imgs.grid), temperature=0.0, max_tokens=MAX_TOKENS, **constraint))]
            ours.append(list(done.output_ids))
            cases.append({"ids": ids, "sample": i, "constraint": {keyword: value}})
    reference = await asyncio.to_thread(_offline, cases, tmp_path / "offline.json")
    for case, mine, theirs in zip(cases, ours, reference):
        text = shapes_oracle.tokenizer.decode(mine, skip_special_tokens=True)
        print(f"\n{list(case['constraint'])[0]:>7} image {case['sample']}: {text!r}")
        assert mine == theirs, (case["constraint"], mine, theirs)
