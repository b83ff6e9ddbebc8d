"""Our proto/ is wire-compatible with SMG's published smg-grpc-proto (the VllmEngine contract).

SMG's .proto files are compiled into a private descriptor pool (the same message
names would collide in the default pool), then (1) every message, field, oneof
and RPC we declare is checked against SMG's, and (2) populated messages
serialized by one side parse identically on the other.
"""

import pathlib

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.json_format import MessageToDict
from grpc_tools import protoc

from vlm_proto import common_pb2, vllm_engine_pb2 as ours

smg_proto = pytest.importorskip("smg_grpc_proto")
SMG_PROTO_DIR = pathlib.Path(smg_proto.__file__).parent / "proto"
EXTENSION_START = 1000  # our own fields (GetServerInfoResponse, EmbedRequest): numbers SMG's contract never uses


@pytest.fixture(scope="module")
def smg_pool(tmp_path_factory) -> descriptor_pool.DescriptorPool:
    out = tmp_path_factory.mktemp("smg") / "smg.pb"
    rc = protoc.main(["protoc", f"-I{SMG_PROTO_DIR}", "--include_imports", f"--descriptor_set_out={out}",
                      str(SMG_PROTO_DIR / "vllm_engine.proto")])
    assert rc == 0, "protoc failed on smg-grpc-proto's vllm_engine.proto"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return pool


def _our_messages():
    for module in (ours, common_pb2):
        yield from module.DESCRIPTOR.message_types_by_name.values()


def _nested(desc):
    yield desc
    for n in desc.nested_types:
        yield from _nested(n)


OWN_PREFIX = "Vlm"  # messages of our own, reached only through extension fields


def _shared(desc) -> bool:
    return not desc.GetOptions().map_entry and not desc.name.startswith(OWN_PREFIX)


def test_our_own_messages_are_unknown_to_smg(smg_pool):
    own = [d.full_name for m in _our_messages() for d in _nested(m) if d.name.startswith(OWN_PREFIX)]
    assert own, "expected at least one Vlm* extension message"
    for name in own:
        with pytest.raises(KeyError):
            smg_pool.FindMessageTypeByName(name)


@pytest.mark.parametrize("name", sorted(d.full_name for m in _our_messages() for d in _nested(m) if _shared(d)))
def test_every_field_matches_smg(smg_pool, name):
    our = ours.DESCRIPTOR.pool.FindMessageTypeByName(name)
    smg = smg_pool.FindMessageTypeByName(name)
    for field in our.fields:
        if field.number >= EXTENSION_START:
            assert field.number not in smg.fields_by_number, f"{name}.{field.name}: number taken by SMG"
            continue
        theirs = smg.fields_by_number.get(field.number)
        assert theirs is not None, f"{name}.{field.name} (#{field.number}) is not in SMG's contract"
        assert (field.name, field.type, field.is_repeated, field.has_presence) == (
            theirs.name, theirs.type, theirs.is_repeated, theirs.has_presence), f"{name}.{field.name} differs"
        if field.message_type is not None:
            assert field.message_type.full_name == theirs.message_type.full_name
        if field.enum_type is not None:
            assert field.enum_type.full_name == theirs.enum_type.full_name
        assert (field.containing_oneof.name if field.containing_oneof and not field.containing_oneof.name.startswith("_") else None) == (
            theirs.containing_oneof.name if theirs.containing_oneof and not theirs.containing_oneof.name.startswith("_") else None)


def test_service_methods_match_smg(smg_pool):
    our = ours.DESCRIPTOR.services_by_name["VllmEngine"]
    smg = smg_pool.FindServiceByName("vllm.grpc.engine.VllmEngine")
    assert our.full_name == smg.full_name == "vllm.grpc.engine.VllmEngine"
    for method in our.methods:
        theirs = smg.methods_by_name[method.name]
        assert method.input_type.full_name == theirs.input_type.full_name
        assert method.output_type.full_name == theirs.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (theirs.client_streaming, theirs.server_streaming)
    assert {m.name for m in smg.methods} == {m.name for m in our.methods}  # every RPC of the contract


def _examples():
    sp = ours.SamplingParams(
        temperature=0.0, top_p=0.9, top_k=5, min_p=0.1, frequency_penalty=0.2, presence_penalty=0.3,
        repetition_penalty=1.1, max_tokens=16, min_tokens=2, stop_token_ids=[7, 8], ignore_eos=True, n=3,
        logprobs=4, prompt_logprobs=2, seed=42, logit_bias={5: -1.5}, json_schema="{}",
        skip_special_tokens=True,
    )
    mm = ours.MultimodalInputs(
        pixel_values=ours.TensorData(shape=[64, 1176], dtype="uint8", inline=b"\x01" * 16),
        model_specific_tensors={"image_grid_thw": ours.TensorData(shape=[1, 3], dtype="int64", inline=b"\0" * 24),
                                "patches_per_image": ours.TensorData(
                                    shape=[1], dtype="int64",
                                    shm=common_pb2.ShmHandle(name="smg-1-2-3", offset=8, nbytes=8, owner_id="smg:1"))},
        im_token_id=449, mm_placeholders=[ours.PlaceholderRange(offset=3, length=16)], mm_hashes=["ab" * 32],
        batched_keys=["image_grid_thw", "patches_per_image"], flat_keys={"pixel_values": "patches_per_image"},
        keep_on_cpu_keys=["image_grid_thw"], modality=common_pb2.IMAGE,
    )
    yield ours.GenerateRequest(request_id="r", tokenized=ours.TokenizedInput(original_text="x", input_ids=[1, 2, 3]),
                               sampling_params=sp, stream=True, mm_inputs=mm, extra_mm_inputs=[mm])
    yield common_pb2.KvEventBatch(sequence_number=7, timestamp=1.5, dp_rank=0, events=[
        common_pb2.KvCacheEvent(event_id=1, stored=common_pb2.KvBlocksStored(
            blocks=[common_pb2.KvBlock(block_hash=-5, token_ids=[1, 2], block_size=2, extra_keys=[
                common_pb2.KvBlockExtraKey(multimodal=common_pb2.KvMultimodalKey(identifier="ab", offset=-1))])],
            parent_block_hash=9, tier=common_pb2.KV_CACHE_TIER_DEVICE, locality=common_pb2.KV_CACHE_LOCALITY_LOCAL)),
        common_pb2.KvCacheEvent(event_id=2, removed=common_pb2.KvBlocksRemoved(block_hashes=[-5])),
        common_pb2.KvCacheEvent(event_id=3, cleared=common_pb2.KvCacheCleared())])
    yield ours.EmbedRequest(request_id="e", tokenized=ours.TokenizedInput(input_ids=[1, 2, 3]))
    yield ours.EmbedResponse(embedding=[0.5, -0.25], prompt_tokens=3, embedding_dim=2)
    top = ours.TopLogProbs(values=[-0.1, -2.0], token_ids=[5, 6])
    yield ours.GenerateResponse(chunk=ours.GenerateStreamChunk(
        token_ids=[5], prompt_tokens=3, completion_tokens=1, cached_tokens=0, index=2,
        output_logprobs=ours.OutputLogProbs(token_logprobs=[-0.1], token_ids=[5], top_logprobs=[top]),
        input_logprobs=ours.InputLogProbs(token_logprobs=[ours.InputTokenLogProb(), ours.InputTokenLogProb(value=-3.0)],
                                          token_ids=[1, 2], top_logprobs=[ours.TopLogProbs(), top])))
    yield ours.GenerateResponse(complete=ours.GenerateComplete(
        output_ids=[5, 6], finish_reason="stop", prompt_tokens=3, completion_tokens=2, cached_tokens=1, index=1,
        matched_token_id=6))
    yield ours.GetServerInfoResponse(active_requests=1, server_type="vlm-servicer", shm_namespace_id="b:1",
                                     mm_device_do_normalize=True, max_num_seqs=8, mm_item_limits="image=8")
    yield ours.GetModelInfoResponse(model_path="m", is_generation=True, max_context_length=4096, vocab_size=1024,
                                    supports_vision=True, eos_token_ids=[2], architectures=["Qwen2VL"])
    yield ours.GetLoadsResponse(timestamp="t", version="v", dp_rank_count=1,
                                loads=[ours.SchedulerLoad(num_running_reqs=1, cache_hit_rate=0.5)])
    yield ours.AbortRequest(request_ids=["a", "b"])
    yield common_pb2.FlushCacheResponse(success=True, message="ok")
    yield common_pb2.GetTokenizerChunk(data=b"PK\x03\x04", sha256="ab" * 32)
    yield common_pb2.StartProfileRequest(start_step=2, num_steps=5)
    yield common_pb2.ProfileResponse(success=True, message="ok")


@pytest.mark.parametrize("message", list(_examples()), ids=lambda m: type(m).__name__)
def test_round_trip_both_ways(smg_pool, message):
    smg_cls = message_factory.GetMessageClass(smg_pool.FindMessageTypeByName(message.DESCRIPTOR.full_name))
    theirs = smg_cls.FromString(message.SerializeToString())
    assert MessageToDict(theirs) == MessageToDict(message)
    back = type(message).FromString(theirs.SerializeToString())
    assert back == message
