"""A KV connector for tests, loaded by vLLM through its own plug-in point (`--kv-transfer-config` with
`kv_connector_module_path`). It moves no KV. When a request finishes it hands back the `kv_transfer_params`
the request carried, under "received", the way a real connector (NIXL) hands a prefill's block ids to the
decode leg. The engine around it is the real one; only the transport is absent."""

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata


class EchoMetadata(KVConnectorMetadata):
    pass


class EchoConnector(KVConnectorBase_V1):
    # Worker side: nothing to load or save.
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        pass

    def wait_for_save(self) -> None:
        pass

    # Scheduler side: no external hits; the params come back when the request ends.
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return EchoMetadata()

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if request.kv_transfer_params is None:
            return False, None
        return False, {"received": request.kv_transfer_params, "prompt_tokens": request.num_prompt_tokens}
