"""vLLM 0.32's private state this servicer still touches, one test each, so an upgrade breaks here, loudly.

Where vLLM 0.32 has a public way, the servicer uses it (device-side norm: build_mm_input_norm; its
Prometheus logger: a PrometheusStatLogger stat-logger factory). The rest, with what each test pins:
  * a processor's `_get_mm_fields_config` (engine_adapter/prompt.py): the model's own tensor layout;
  * the shm sender cache's `_shm_cache.writer_flag` (engine_adapter/shm_ring.release_holds);
  * `ZmqEventPublisher._is_bind_endpoint` (engine_adapter/kv_events.py): who binds the KV-event socket;
  * `shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS` (engine_adapter/vllm_plugins.py);
  * the engine-core client's `call_utility_all_async` (engine_adapter/engine.py reset_prefix_cache_by_rank):
    each data-parallel rank's own answer, which AsyncLLM.reset_prefix_cache folds into one.
No engine is started.
"""

import importlib.metadata
import inspect
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import BatchFeature
from vllm.config import ModelConfig
from vllm.distributed.device_communicators import shm_broadcast
from vllm.distributed.kv_events import ZmqEventPublisher
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.cache.shm import ShmObjectStoreSenderCache
from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFlatField, MultiModalKwargsItem
from vllm.multimodal.processing.processor import BaseMultiModalProcessor

from engine_adapter import vllm_plugins
from engine_adapter.families import FAMILIES
from engine_adapter.shm_ring import hold_id, release_holds
from tests.fixtures import ROOT

CHANGED = "vLLM changed {what}; revisit {where} (see this module's docstring)"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_types[0])
def test_processor_field_config_lays_out_the_familys_tensors(family):
    """prompt.py lays each item out with the model's own `_get_mm_fields_config(hf_inputs, kwargs)`: its
    pixels flat by grid rows, its grid (and seconds per step, where the family names them) one per item."""
    where = "engine_adapter/prompt.py::_item"
    params = list(inspect.signature(BaseMultiModalProcessor._get_mm_fields_config).parameters)
    assert params == ["self", "hf_inputs", "hf_processor_mm_kwargs"], CHANGED.format(what="_get_mm_fields_config's signature", where=where)
    processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(ROOT / family.tiny.folder), max_model_len=4096))
    for modality in ("image", "video"):
        names = family.fields(modality)
        tensors = BatchFeature({names.grid: torch.tensor([[2, 4, 6]]), names.pixels: torch.zeros(48, 8)})
        if names.seconds:
            tensors[names.seconds] = torch.tensor([0.5])
        fields = processor._get_mm_fields_config(tensors, {})
        layout = {key: (type(config.field), config.modality) for key, config in fields.items() if key in tensors}
        expected = {names.pixels: (MultiModalFlatField, modality), names.grid: (MultiModalBatchedField, modality)}
        if names.seconds:
            expected[names.seconds] = (MultiModalBatchedField, modality)
        assert layout == expected, CHANGED.format(what=f"{family.name}'s {modality} field config: {layout}", where=where)


@pytest.fixture
def sender_cache(monkeypatch):
    """A real shm sender cache (1 MiB ring, one reader) on a ring name of this test's own."""
    monkeypatch.setenv("VLLM_OBJECT_STORAGE_SHM_BUFFER_NAME", f"vlm-servicer-test-{os.getpid()}-ring")
    mm = SimpleNamespace(mm_processor_cache_gb=1 / 1024, mm_shm_cache_max_object_size_mb=1)
    config = SimpleNamespace(parallel_config=SimpleNamespace(world_size=1),
                             model_config=SimpleNamespace(get_multimodal_config=lambda: mm))
    cache = ShmObjectStoreSenderCache(config)
    yield cache
    cache.close()


def test_shm_sender_cache_holds_are_writer_flags(sender_cache):
    """Each put or lookup of an item takes one writer hold (`_shm_cache.writer_flag[monotonic_id]`, the id
    the returned address item carries); releasing them lets the ring free the item."""
    where = "engine_adapter/shm_ring.py::release_holds"
    item, _ = sender_cache.get_and_update_item((MultiModalKwargsItem.dummy(64), []), "a")
    again, _ = sender_cache.get_and_update_item((MultiModalKwargsItem.dummy(64), []), "a")
    held = [hold_id(item), hold_id(again)]
    store = getattr(sender_cache, "_shm_cache", None)
    assert store is not None and isinstance(getattr(store, "writer_flag", None), dict), CHANGED.format(
        what="ShmObjectStoreSenderCache._shm_cache.writer_flag", where=where)
    assert held[0] == held[1] and store.writer_flag == {held[0]: 2}, CHANGED.format(
        what=f"how holds are counted ({store.writer_flag}, ids {held})", where=where)
    release_holds(sender_cache, held)
    store.free_unused()
    assert not sender_cache.is_cached_item("a"), CHANGED.format(what="when the ring frees a released item", where=where)


@pytest.mark.parametrize("endpoint, binds", [
    ("ipc:///tmp/kv-events", True), ("inproc://kv", True), ("tcp://*:5557", True), ("tcp://[::]:5557", True),
    ("tcp://10.0.0.7:5557", False), ("tcp://localhost:5557", False),
])
def test_kv_event_publisher_bind_rule(endpoint, binds):
    """The relay binds where vLLM's publisher connects and connects where it binds."""
    rule = inspect.getattr_static(ZmqEventPublisher, "_is_bind_endpoint", None)
    assert isinstance(rule, staticmethod), CHANGED.format(what="ZmqEventPublisher._is_bind_endpoint",
                                                          where="engine_adapter/kv_events.py::KvEventRelay")
    assert ZmqEventPublisher._is_bind_endpoint(endpoint) is binds, CHANGED.format(
        what=f"whether its KV-event publisher binds {endpoint}", where="engine_adapter/kv_events.py::KvEventRelay")


def test_shm_reader_recheck_plugin(monkeypatch):
    """Our general plugin sets the module constant an idle reader's wait is capped by."""
    where = "engine_adapter/vllm_plugins.py::bound_idle_shm_waits"
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("vlm_servicer_shm_waits") == "engine_adapter.vllm_plugins:bound_idle_shm_waits"
    assert isinstance(getattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", None), int), CHANGED.format(
        what="shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS", where=where)
    monkeypatch.setattr(shm_broadcast, "SHM_READER_RECHECK_INTERVAL_MS", shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS)
    monkeypatch.setenv(vllm_plugins.SHM_RECHECK_ENV, "20")
    vllm_plugins.bound_idle_shm_waits()
    wait = shm_broadcast.MessageQueue.ReadTimeoutWithWarnings(None, should_warn=False)
    assert wait.timeout_ms() == 20, CHANGED.format(what="what caps an idle shared-memory reader's wait", where=where)


def test_the_core_client_asks_every_rank_for_its_own_prefix_cache_reset():
    """FlushCache names the ranks that could not flush: AsyncLLM's `engine_core.call_utility_all_async` returns
    one result per engine core, and EngineCore.reset_prefix_cache takes (reset_running_requests, reset_connector)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.core_client import AsyncMPClient

    where = "engine_adapter/engine.py::reset_prefix_cache_by_rank"
    assert "call_utility_all_async" in vars(AsyncMPClient), CHANGED.format(what="AsyncMPClient.call_utility_all_async", where=where)
    assert list(inspect.signature(EngineCore.reset_prefix_cache).parameters) == [
        "self", "reset_running_requests", "reset_connector"], CHANGED.format(what="EngineCore.reset_prefix_cache", where=where)
    assert "engine_core" in inspect.getsource(AsyncLLM.__init__), CHANGED.format(what="AsyncLLM.engine_core", where=where)
