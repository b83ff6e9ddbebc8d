"""Bad input gets INVALID_ARGUMENT naming the field (fixed limits too: see test_error_codes.py); the engine keeps serving."""

import grpc
import pytest
import torch

from tests.fixtures import image, mm_inputs, request, tensor
from vlm_proto import common_pb2, vllm_engine_pb2 as pb

pytestmark = pytest.mark.engine
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def one_image(oracle):
    imgs = oracle.images([image(112, 112, seed=11)])
    return oracle.chat_ids("Describe the image.", 1), imgs


def _bad_requests(oracle, one_image, vocab, max_len):
    ids, imgs = one_image
    text = oracle.chat_ids("Describe the image.")
    pv, grid = imgs.pixel_values, imgs.grid

    def mm(**kw):
        return mm_inputs(pv, grid, **kw)

    wrong_len = mm()
    wrong_len.pixel_values.inline = wrong_len.pixel_values.inline[:-4]
    bad_dtype = mm()
    bad_dtype.pixel_values.dtype = "float64"
    two_grids = mm_inputs(pv, torch.cat([grid, grid]))
    extra_tensor = mm()
    extra_tensor.model_specific_tensors["foo"].CopyFrom(tensor(grid))
    short_grid = mm_inputs(pv, torch.tensor([[1, 4, 4]]))
    cut_keep = len(ids) + 15 - (ids.index(oracle.pad) + 8)  # (left) truncation starting 8 tokens into the image
    cases = {
        "empty ids": (request([], max_tokens=4), INVALID, "tokenized.input_ids: empty"),
        "id >= vocab": (request(text + [vocab], max_tokens=4), INVALID, f"tokenized.input_ids[{len(text)}]"),
        "prompt over context": (request([5] * max_len, max_tokens=4), INVALID, "context"),
        "byte length": (request(ids, mm=wrong_len, max_tokens=4), INVALID, "mm_inputs.pixel_values:"),
        "unknown dtype": (request(ids, mm=bad_dtype, max_tokens=4), INVALID, "mm_inputs.pixel_values.dtype"),
        "placeholder count": (request(ids + [oracle.pad], mm=mm(), max_tokens=4), INVALID, "1 images"),
        "range out of bounds": (
            request(ids, mm=mm(mm_placeholders=[pb.PlaceholderRange(offset=len(ids) - 2, length=16)]), max_tokens=4),
            INVALID, "mm_inputs.mm_placeholders[0]"),
        "ranges overlap": (
            request(oracle.chat_ids("x", 2, [16, 16]), mm=mm_inputs(torch.cat([pv, pv]), torch.cat([grid, grid]),
                    mm_placeholders=[pb.PlaceholderRange(offset=10, length=16), pb.PlaceholderRange(offset=20, length=16)]),
                    max_tokens=4),
            INVALID, "overlaps"),
        "grid vs pixel rows": (request(ids, mm=two_grids, max_tokens=4), INVALID, "image_grid_thw implies"),
        "grid too small": (request(ids, mm=short_grid, max_tokens=4), INVALID, "mm_inputs.pixel_values: shape"),
        "n over limit": (request(text, n=99, max_tokens=4), INVALID, "sampling_params.n"),
        "max_tokens over context": (request(text, max_tokens=max_len), INVALID, "sampling_params.max_tokens"),
        "logprobs over limit": (request(text, max_tokens=2, logprobs=1000), INVALID, "sampling_params.logprobs"),
        "negative temperature": (request(text, max_tokens=4, temperature=-1.0), INVALID, "sampling_params.temperature"),
        "negative top_p": (request(text, max_tokens=4, top_p=-0.5), INVALID, "sampling_params.top_p"),
        "min_p over 1": (request(text, max_tokens=4, min_p=1.5), INVALID, "sampling_params.min_p"),
        "empty stop string": (request(text, max_tokens=4, stop=[""]), INVALID, "sampling_params.stop"),
        "logit_bias outside vocab": (request(text, max_tokens=4, logit_bias={vocab + 5: 1.0}), INVALID,
                                     "sampling_params.logit_bias"),
        "invalid json schema": (request(text, max_tokens=4, json_schema='{"type": "nope"}'), INVALID,
                                "sampling_params.json_schema"),
        "json schema not json": (request(text, max_tokens=4, json_schema="{not json"), INVALID,
                                 "sampling_params.json_schema"),
        "invalid regex": (request(text, max_tokens=4, regex="(unclosed"), INVALID, "sampling_params.regex"),
        "regex with NUL": (request(text, max_tokens=4, regex="a\x00b"), INVALID, "sampling_params.regex"),
        "invalid grammar": (request(text, max_tokens=4, grammar="root ::= ("), INVALID, "sampling_params.grammar"),
        "empty choice": (request(text, max_tokens=4, choice=pb.ChoiceConstraint()), INVALID, "sampling_params.choice"),
        "json_object false": (request(text, max_tokens=4, json_object=False), INVALID, "sampling_params.json_object"),
        "invalid structural tag": (request(text, max_tokens=4, structural_tag='{"type": "nope"}'), INVALID,
                                   "sampling_params.structural_tag"),
        "truncate 0": (request(text, max_tokens=4, truncate_prompt_tokens=0), INVALID,
                       "sampling_params.truncate_prompt_tokens"),
        "truncate over context": (request(text, max_tokens=4, truncate_prompt_tokens=max_len + 1), INVALID,
                                  "sampling_params.truncate_prompt_tokens"),
        "truncate into image": (request(ids, mm=mm(), max_tokens=4, truncate_prompt_tokens=cut_keep), INVALID,
                                f"keeping {cut_keep} of {len(ids) + 15} prompt tokens"),
        "kv transfer without a connector": (
            pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=text), kv_transfer_params_json="{}"),
            grpc.StatusCode.FAILED_PRECONDITION, "--kv-transfer-config"),
        "legacy kv transfer without a connector": (
            pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=text),
                               kv_transfer_params=pb.KvTransferParams(remote_host="127.0.0.1", remote_port=1)),
            grpc.StatusCode.FAILED_PRECONDITION, "kv_transfer_params: this worker has no KV connector"),
        "kv transfer not JSON": (
            pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=text), kv_transfer_params_json="{nope"),
            INVALID, "kv_transfer_params_json: not JSON"),
        "kv transfer not an object": (
            pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=text), kv_transfer_params_json="[1]"),
            INVALID, "kv_transfer_params_json: a JSON object is expected"),
        "data parallel rank": (pb.GenerateRequest(tokenized=pb.TokenizedInput(input_ids=text), data_parallel_rank=1),
                               INVALID, "data_parallel_rank"),
        "text input": (pb.GenerateRequest(text="hello", sampling_params=pb.SamplingParams(max_tokens=4)), INVALID, "text"),
        "video batch of image tensors": (
            request(ids, mm=mm(modality=common_pb2.VIDEO), max_tokens=4), INVALID, "missing 'video_grid_thw'"),
        "videos over limit": (  # the session engine runs with --limit-mm-per-prompt video 0
            request(ids, mm=pb.MultimodalInputs(pixel_values=tensor(pv), modality=common_pb2.VIDEO,
                                                model_specific_tensors={"video_grid_thw": tensor(grid)}), max_tokens=4),
            INVALID, "1 videos exceed this engine's limit of 0"),
        "two image batches": (
            request(ids, mm=mm(), max_tokens=4, extra=[mm()]), INVALID, "extra_mm_inputs[0].modality: a second image batch"),
        "shm payload": (
            request(ids, mm=pb.MultimodalInputs(
                pixel_values=pb.TensorData(shape=list(pv.shape), dtype="float32",
                                           shm=common_pb2.ShmHandle(name="../etc/passwd", nbytes=pv.numel() * 4)),
                model_specific_tensors={"image_grid_thw": tensor(grid)}), max_tokens=4),
            INVALID, "mm_inputs.pixel_values.shm"),
        "unexpected tensor": (request(ids, mm=extra_tensor, max_tokens=4), INVALID, "unexpected ['foo']"),
    }
    return cases


CASE_NAMES = [
    "empty ids", "id >= vocab", "prompt over context", "byte length", "unknown dtype", "placeholder count",
    "range out of bounds", "ranges overlap", "grid vs pixel rows", "grid too small", "n over limit",
    "max_tokens over context", "logprobs over limit", "negative temperature", "negative top_p", "min_p over 1",
    "empty stop string", "logit_bias outside vocab", "invalid json schema", "json schema not json", "invalid regex",
    "regex with NUL", "invalid grammar", "empty choice", "json_object false", "invalid structural tag", "truncate 0",
    "truncate over context", "truncate into image", "kv transfer without a connector",
    "legacy kv transfer without a connector", "kv transfer not JSON", "kv transfer not an object",
    "data parallel rank", "text input",
    "video batch of image tensors", "videos over limit", "two image batches", "shm payload", "unexpected tensor",
]


@pytest.mark.parametrize("name", CASE_NAMES)
async def test_bad_input_is_refused_by_field_and_engine_keeps_serving(stub, engine, oracle, one_image, name):
    req, code, fragment = _bad_requests(oracle, one_image, engine.info.vocab_size, engine.info.max_model_len)[name]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(req):
            pass
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()
    ids, imgs = one_image
    good = [r async for r in stub.Generate(request(ids, mm=mm_inputs(imgs.pixel_values, imgs.grid), temperature=0.0, max_tokens=2))]
    assert len(good[-1].complete.output_ids) == 2
