"""Read what the servicer must know about the model from vLLM's resolved config."""

import logging
from typing import cast

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.fusion.mm_input_norm import FusedMMInputNorm, build_mm_input_norm
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.encoder_budget import MultiModalBudget
from vllm.transformers_utils.processor import cached_image_processor_from_config

from engine_adapter.families import Family, family_for
from engine_adapter.pixels import PixelNorm
from engine_adapter.types import ModelInfo

logger = logging.getLogger(__name__)


# Sampling defaults a generation config may set that the wire's SamplingParams carries.
_SAMPLING_DEFAULTS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
)


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _family(model) -> Family | None:
    """The served model's family; an unregistered multimodal model is served as text only."""
    if not model.is_multimodal_model:
        return None
    family = family_for(model.architectures, model.hf_config.model_type)
    if family is None:
        logger.warning(
            "%s (%s) is not a registered model family (engine_adapter/families): serving text only, "
            "images and videos are refused",
            model.model,
            ", ".join(model.architectures),
        )
    return family


def _encoder_budget(config: VllmConfig) -> int:
    """vLLM's encoder budget (the lesser of its compute budget and cache size), as its start-up logs it."""
    if not config.model_config.is_multimodal_model:
        return 0
    return MultiModalBudget(config, MULTIMODAL_REGISTRY, enable_cache=False).get_encoder_budget()


def _default_sampling(config: VllmConfig) -> dict:
    """The model's generation-config defaults that a gateway applies to requests that leave them unset."""
    return {k: v for k, v in config.model_config.get_diff_sampling_param().items() if k in _SAMPLING_DEFAULTS}


def model_info(config: VllmConfig, tokenizer, log_requests: bool = False) -> ModelInfo:
    model = config.model_config
    hf = model.hf_config
    text = hf.get_text_config()
    family = _family(model)
    tokens = family.token_ids(hf) if family else dict.fromkeys(("image_pad", "video_pad", "vision_start", "vision_end"))
    mm = model.multimodal_config
    limits = {}
    if mm is not None:
        limits = {m: mm.get_limit_per_prompt(m) for m in ("image", "video")}
        limits = {m: n for m, n in limits.items() if n > 0}
    structured, kv = config.structured_outputs_config, config.kv_transfer_config
    eos = _token_ids(getattr(text, "eos_token_id", None) or getattr(hf, "eos_token_id", None))
    return ModelInfo(
        model_path=model.model,
        # vLLM annotates these fields with what the user may pass; ModelConfig.__post_init__ resolves the name
        # to a str (the first of a list) and the dtype to a torch.dtype.
        served_model_name=cast(str, model.served_model_name) or model.model,
        runner=model.runner_type,
        model_type=hf.model_type,
        architectures=tuple(model.architectures),
        max_model_len=model.max_model_len,
        vocab_size=model.get_vocab_size(),
        eos_token_ids=eos,
        bos_token_id=int(getattr(text, "bos_token_id", None) or -1),
        pad_token_id=int(getattr(text, "pad_token_id", None) or -1),
        family=family,
        image_token_id=tokens["image_pad"],
        video_token_id=tokens["video_pad"],
        vision_start_token_id=tokens["vision_start"],
        vision_end_token_id=tokens["vision_end"],
        spatial_merge_size=family.merge_size(hf.vision_config) if family else 1,
        patch_dim=family.patch_dim(hf.vision_config) if family else 0,
        supports_vision=family is not None,
        mm_item_limits=limits,
        device_normalizes_pixels=bool(mm is not None and mm.mm_device_do_normalize),
        dtype=cast(torch.dtype, model.dtype),
        kv_cache_dtype=str(config.cache_config.cache_dtype),
        block_size=config.cache_config.block_size or 0,
        max_num_seqs=config.scheduler_config.max_num_seqs,
        data_parallel_size=config.parallel_config.data_parallel_size,
        max_logprobs=model.max_logprobs,
        tokenizer_path=model.tokenizer or model.model,
        truncation_side=tokenizer.truncation_side,
        default_sampling=_default_sampling(config),
        reasoning_parser=structured.reasoning_parser or "",
        # vLLM holds a grammar back until the reasoning parser has seen the thought's end,
        # unless it is told to constrain the reasoning too.
        constrained_decoding_start="after_reasoning"
        if structured.reasoning_parser and not structured.enable_in_reasoning
        else "first_token",
        mm_encoder_budget=_encoder_budget(config),
        attention_backend=config.attention_config.backend.name if config.attention_config.backend else "",
        kv_connector=(kv and kv.kv_connector) or "",
        kv_role=(kv and kv.kv_role) or "",
        kv_engine_id=(kv and kv.engine_id) or "",
        # NIXL loads a remote-prefill request's whole prompt or fails the request. Under a connector that may
        # load less, or a "recompute" policy, the engine would encode an image it has no pixels for, and that
        # kills vLLM's engine core.
        kv_consumer_without_pixels=bool(
            kv and kv.is_kv_consumer and kv.kv_connector == "NixlConnector" and kv.kv_load_failure_policy == "fail"
        ),
        profiler=config.profiler_config.profiler or "",
        kv_events=bool(
            config.kv_events_config
            and config.kv_events_config.enable_kv_cache_events
            and config.kv_events_config.publisher == "zmq"
        ),
        log_requests=log_requests,
    )


def pixel_norm(config: VllmConfig) -> PixelNorm | None:
    """Raw 0..255 pixels to what the tower takes: with device-side normalisation, the transform vLLM's tower
    applies (build_mm_input_norm, which reads the current config); otherwise the image processor's that
    vLLM would run on the host (its do_rescale/do_normalize then say what it does)."""
    model = config.model_config
    if model.multimodal_config is None:  # what vLLM's is_multimodal_model tests
        return None
    if model.multimodal_config.mm_device_do_normalize:
        with set_current_vllm_config(config):
            norm = build_mm_input_norm(model)
        if not isinstance(norm, FusedMMInputNorm):  # the identity: the tower only casts
            return PixelNorm((0.0,) * 3, (1.0,) * 3, 1.0)
        weight, bias = norm.get_buffer("weight"), norm.get_buffer("bias")
        return PixelNorm.from_affine(tuple(weight.tolist()), tuple(bias.tolist()))
    processor = cached_image_processor_from_config(model)
    rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
    if not processor.do_normalize:
        return PixelNorm((0.0,) * 3, (1.0,) * 3, rescale)
    per_channel = lambda v: tuple(map(float, v)) if isinstance(v, (list, tuple)) else (float(v),) * 3  # noqa: E731
    return PixelNorm(per_channel(processor.image_mean), per_channel(processor.image_std), rescale)


def ordinary_token_ids(tokenizer, vocab_size: int) -> tuple[int, ...]:
    """Token ids that are neither special nor added tokens: safe stand-ins for image pad values."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return tuple(sorted(i for i in tokenizer.get_vocab().values() if i not in special and i < vocab_size))
