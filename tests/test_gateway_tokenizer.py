"""A gateway without the model's files (another machine, a router pod) takes the tokenizer from us: SMG started
with no --model-path, the hub unreachable, and the worker's model folder gone from this filesystem once the
engine has loaded it, fetches GetTokenizer's bundle and then serves an image chat completion with exactly the
ids and pixels HF makes.
"""

import shutil

import pytest
import pytest_asyncio
import torch

from servicer.tensors import decode_tensor
from tests.conftest import _start_engine, extra_server
from tests.fixtures import MODEL, image
from tests.test_gateway import _chat_body, _launch, _same_text
from vlm_proto import common_pb2

pytestmark = pytest.mark.gateway

# No hub to fall back on: the loopback discard port, and offline.
NO_HUB = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest_asyncio.fixture(scope="module")
async def worker_only(tmp_path_factory):
    """An engine and server on a copy of the tiny model whose folder is deleted once they are up (the bundle is
    built first, as a worker that has its files does when first asked)."""
    folder = tmp_path_factory.mktemp("worker-only") / "tiny-qwen2-vl"
    shutil.copytree(MODEL, folder)
    engine = await _start_engine(folder)
    try:
        async with extra_server(engine, folder) as (server, stub):
            [chunk async for chunk in stub.GetTokenizer(common_pb2.GetTokenizerRequest())]
            shutil.rmtree(folder)
            yield server, stub
    finally:
        engine.shutdown()


async def test_smg_without_the_model_files_takes_the_tokenizer_from_the_worker(worker_only, tmp_path_factory,
                                                                               capture, oracle):
    server, _ = worker_only
    text, pil = "Describe the image.", [image(112, 112, seed=21)]
    async for gw in _launch(server, None, tmp_path_factory, "inline", env=NO_HUB):
        with gw.dump_log_on_failure():
            status, answer = await gw.chat(_chat_body(gw.model, text, pil))
            assert status == 200, answer
            log = gw.tail(100_000)
            assert "Fetching tokenizer from worker" in log
            assert "Preloaded multimodal config from GetTokenizer bundle" in log
            [sent], [served] = capture.requests, capture.outputs
            imgs = oracle.images(pil)
            # The template, the tokenizer and the image processor settings all came from our bundle.
            assert list(sent.tokenized.input_ids) == oracle.chat_ids(text, 1, imgs.tokens_per_image)
            grid = decode_tensor("grid", sent.mm_inputs.model_specific_tensors["image_grid_thw"])
            assert torch.equal(grid.to(torch.int64), imgs.grid)
            _same_text(answer["choices"][0]["message"]["content"], served, oracle)
