"""End to end through the real SMG gateway: OpenAI chat completions with images -> SMG -> our servicer.

The gateway (`smg launch`, inline tensor transport) runs as a subprocess in front of the
session's gRPC server. For each request the test captures the GenerateRequest SMG sent
and the token ids our servicer answered with, then checks that
  * the HTTP answer is 200 and its text decodes from exactly those ids;
  * SMG sent the ids and pixels HF's processor makes for the same images;
  * replaying SMG's request directly over gRPC gives the same ids;
  * HF greedy on the same ids and pixels gives the same ids, except after a near-tie.
"""

import asyncio
import os
import time

import pytest
import torch

from harness.gateway import launch_gateway, smg_executable
from harness.images import data_url
from servicer.tensors import decode_tensor
from tests.fixtures import image
from tests.oracle import Oracle  # the `oracle` fixture itself is conftest's (session)
from vlm_proto import vllm_engine_pb2 as pb

pytestmark = pytest.mark.gateway

if smg_executable() is None:
    pytest.skip("the SMG gateway (`smg` executable, pip package smg) is not installed", allow_module_level=True)

MAX_TOKENS = 8
TIE_GAP = 1e-3  # random weights: HF and vLLM may part only where HF's top-2 logprob gap is this small


@pytest.fixture(scope="module")
async def gateway(server, model_path, tmp_path_factory):
    """`smg launch` (inline tensors) in front of the session's servicer."""
    async for gw in _launch(server, model_path, tmp_path_factory, "inline"):
        yield gw


@pytest.fixture(scope="module")
async def shm_gateway(server, model_path, tmp_path_factory):
    """`smg launch --multimodal-tensor-transport shm` in front of the session's servicer."""
    async for gw in _launch(server, model_path, tmp_path_factory, "shm"):
        yield gw


async def _launch(server, model_path, tmp_path_factory, transport: str, *flags: str, workers: int = 1,
                  env: dict | None = None):
    """Start SMG (log to a tmp file) in front of `server` (a server or a list of gRPC ports), yield it once
    `workers` workers are healthy, stop it. `flags` go to `smg launch` as they are; without `model_path` SMG
    takes the model from the worker. The wait runs in a thread: the servicer shares this event loop."""
    log = tmp_path_factory.mktemp("smg") / "smg.log"
    ports = server if isinstance(server, list) else [server.port]
    started = time.monotonic()
    gw = await asyncio.to_thread(launch_gateway, [f"grpc://127.0.0.1:{p}" for p in ports], log,
                                 "--multimodal-tensor-transport", transport, *flags, model=model_path,
                                 workers=workers, health=(), env=env)
    try:
        print(f"\nsmg ready in {time.monotonic() - started:.1f} s (pid {gw.proc.pid}, model {gw.model!r}, log {log})")
        yield gw
    finally:
        await asyncio.to_thread(gw.stop)


def _pixels_per_channel_normalized(raw: torch.Tensor, oracle: Oracle) -> torch.Tensor:
    """SMG's uint8 patches as HF's processor would hand them to the tower: (x/255 - mean) / std."""
    proc = oracle.processor.image_processor
    mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(1, 3, 1)
    std = torch.tensor(proc.image_std, dtype=torch.float32).view(1, 3, 1)
    x = raw.reshape(raw.shape[0], 3, -1).to(torch.float32)
    return ((x * proc.rescale_factor - mean) / std).reshape(raw.shape)


def _chat_body(model: str, text: str, pil: list) -> dict:
    # SMG puts a message's images before its text; send them text-first to exercise that.
    content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pil]
    return {
        "model": model, "messages": [{"role": "user", "content": content}],
        "temperature": 0, "max_tokens": MAX_TOKENS, "skip_special_tokens": False,
    }


def _same_text(smg_text: str, ids: list[int], oracle: Oracle) -> None:
    """SMG's incremental detokenizer withholds a trailing incomplete UTF-8 sequence (HF decodes it to U+FFFD)."""
    decoded = oracle.tokenizer.decode(ids, skip_special_tokens=False)
    assert smg_text in (decoded, decoded.rstrip("\ufffd")), (smg_text, decoded)


async def _replay(stub, sent: pb.GenerateRequest, **changes) -> list[int]:
    """Send SMG's captured request straight to our servicer (new request id); the one sample's ids."""
    direct = pb.GenerateRequest()
    direct.CopyFrom(sent)
    direct.request_id = f"{sent.request_id}-direct"
    for name, value in changes.items():
        setattr(direct, name, value)
    [complete] = [r.complete async for r in stub.Generate(direct) if r.HasField("complete")]
    return list(complete.output_ids)


CASES = {
    "one_image": ("Describe the image.", [(112, 112, 11)]),
    "two_images": ("Compare the two images.", [(112, 112, 12), (56, 140, 13)]),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_chat_completion_through_smg_matches_direct_grpc_and_hf(name, gateway, capture, stub, oracle):
    text, sizes = CASES[name]
    pil = [image(w, h, seed) for w, h, seed in sizes]
    body = _chat_body(gateway.model, text, pil)
    with gateway.dump_log_on_failure():
        t0 = time.monotonic()
        status, answer = await gateway.chat(body)
        http_s = time.monotonic() - t0
        assert status == 200, f"HTTP {status}: {answer}"

        # Exactly one Generate reached us (SMG retries a failed call with a new request id).
        assert len(capture.requests) == 1, [r.request_id for r in capture.requests]
        sent = capture.requests[0]
        assert not sent.stream and len(capture.outputs) == 1, f"stream={sent.stream}, answers {capture.outputs}"
        [served] = capture.outputs
        choice = answer["choices"][0]
        print(f"\n{name}: HTTP {http_s * 1e3:.0f} ms, SMG request {sent.request_id}, stream={sent.stream}, "
              f"{len(sent.tokenized.input_ids)} prompt ids, served {served}, text {choice['message']['content']!r}")

        # The HTTP answer is what we served.
        assert answer["usage"]["completion_tokens"] == len(served)
        assert answer["usage"]["prompt_tokens"] == len(sent.tokenized.input_ids)
        _same_text(choice["message"]["content"], served, oracle)

        # SMG sent the ids and the pixels HF's processor makes for these images.
        imgs = oracle.images(pil)
        expected_ids = oracle.chat_ids(text, len(pil), imgs.tokens_per_image)
        assert list(sent.tokenized.input_ids) == expected_ids
        mm = sent.mm_inputs
        grid = decode_tensor("grid", mm.model_specific_tensors["image_grid_thw"]).to(torch.int64)
        assert torch.equal(grid, imgs.grid)
        smg_pixels = decode_tensor("pixel_values", mm.pixel_values)
        if smg_pixels.dtype == torch.uint8:  # we announce mm_device_do_normalize: SMG sends raw pixels
            assert torch.equal(smg_pixels, imgs.raw)
            smg_pixels = _pixels_per_channel_normalized(smg_pixels, oracle)
        torch.testing.assert_close(smg_pixels.to(torch.float32), imgs.pixel_values, atol=1e-5, rtol=0)

        # Replaying SMG's request directly over gRPC gives the same ids.
        assert await _replay(stub, sent) == served

        # HF greedy on the same ids and pixels: equal, or parted only at a near-tie.
        reference, gaps = await asyncio.to_thread(oracle.greedy, expected_ids, imgs, MAX_TOKENS)
        parted = next((i for i, (a, b) in enumerate(zip(served, reference)) if a != b), None)
        if parted is None:
            if len(served) < MAX_TOKENS:  # stopped early: only on an end-of-sequence token
                eos = oracle.model.generation_config.eos_token_id
                assert choice["finish_reason"] == "stop" and served[-1] in (eos if isinstance(eos, list) else [eos])
        else:
            print(f"{name}: parted from HF at token {parted}, where HF's top-2 gap is {gaps[parted]:.2e}")
            assert gaps[parted] < TIE_GAP, (
                f"token {parted}: served {served[parted]} vs HF {reference[parted]}, HF top-2 gap {gaps[parted]:.3g}"
            )


async def test_streamed_chat_completion_through_smg_matches_direct_grpc(gateway, capture, stub, oracle):
    """A streamed chat completion: SMG calls Generate with stream=true and relays our chunks as SSE deltas."""
    text, sizes = CASES["two_images"]
    body = _chat_body(gateway.model, text, [image(w, h, seed) for w, h, seed in sizes])
    with gateway.dump_log_on_failure():
        status, events = await gateway.chat_stream(body)
        assert status == 200, f"HTTP {status}: {events}"
        assert len(capture.requests) == 1, [r.request_id for r in capture.requests]
        sent = capture.requests[0]
        assert sent.stream
        choices = [c for e in events for c in e["choices"]]
        streamed = "".join(c["delta"].get("content") or "" for c in choices)
        finish = [c["finish_reason"] for c in choices if c.get("finish_reason")]
        print(f"\nstreamed: {len(events)} events, text {streamed!r}, finish {finish}")
        served = await _replay(stub, sent, stream=False)
        _same_text(streamed, served, oracle)
        assert finish == ["length" if len(served) == MAX_TOKENS else "stop"]


async def test_shm_transport_through_smg(shm_gateway, capture, server, oracle):
    """SMG publishes the pixels in /dev/shm; we read them through a memory map, unlink them, answer right."""
    text, sizes = CASES["one_image"]
    pil = [image(w, h, seed) for w, h, seed in sizes]
    shm_before = server.metrics.mm_bytes.labels("shm")._value.get()
    with shm_gateway.dump_log_on_failure():
        status, answer = await shm_gateway.chat(_chat_body(shm_gateway.model, text, pil))
        assert status == 200, f"HTTP {status}: {answer}"
        [sent] = capture.requests
        handle = sent.mm_inputs.pixel_values
        assert handle.WhichOneof("payload") == "shm", "SMG did not use shared memory"
        assert not os.path.exists(f"/dev/shm/{handle.shm.name}")  # consumed and unlinked
        assert server.metrics.mm_bytes.labels("shm")._value.get() - shm_before == handle.shm.nbytes
        imgs = oracle.images(pil)
        expected_ids = oracle.chat_ids(text, len(pil), imgs.tokens_per_image)
        reference, gaps = await asyncio.to_thread(oracle.greedy, expected_ids, imgs, MAX_TOKENS)
        [served] = capture.outputs
        parted = next((i for i, (a, b) in enumerate(zip(served, reference)) if a != b), None)
        assert parted is None or gaps[parted] < TIE_GAP, (served, reference)
