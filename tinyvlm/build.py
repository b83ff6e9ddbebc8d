"""Build the deterministic random-weight tiny checkpoints: Qwen2-VL, Qwen2.5-VL, Qwen3-VL.

Shaped for the CPU engine (decoder head_dim 64, M-RoPE sections summing to 32) and for
SMG's specs: `vision_token_id` = `<|image_pad|>` and `<image>` in the vocabulary (its
Qwen2/2.5-VL spec), `<|image_pad|>` in the chat template (its Qwen3-VL spec), and
`min_pixels`/`max_pixels` in the image-processor config. SMG picks the family's
preprocessing from the folder name (`qwen2.5-vl`, `qwen3-vl`), so keep those in it.
"""

import argparse
import json
import pathlib

import torch
from transformers import (
    Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
    Qwen3VLVideoProcessor,
)

from tinyvlm.tokenizer import build_tokenizer

VOCAB_SIZE = 1024
SEED = 1234
# Bump when anything below changes, so `make` rebuilds stale checkpoints.
RECIPE_VERSION = "qwen2-vl-random-2"


def build_config(tokenizer, text: dict | None = None, vision: dict | None = None) -> Qwen2VLConfig:
    """The tiny config; `text`/`vision` override sub-config fields (the trained checkpoint
    widens the vision tower). The decoder's head_dim must stay 64 for vLLM's CPU attention."""
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}) | (text or {}),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            initializer_range=0.1,
        ) | (vision or {}),
        tie_word_embeddings=False, **_token_ids(tokenizer),
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    return config


def build_image_processor(patch_size: int = 14, mean_std: float | None = None) -> Qwen2VLImageProcessorPil:
    # 56x56 .. 1280x1280-ish: a 112x112 image is 8x8 patches, 16 placeholder tokens.
    factor = patch_size * 2
    extra = {"image_mean": [mean_std] * 3, "image_std": [mean_std] * 3} if mean_std is not None else {}
    return Qwen2VLImageProcessorPil(
        min_pixels=4 * factor * factor, max_pixels=2048 * factor * factor,
        patch_size=patch_size, temporal_patch_size=2, merge_size=2, **extra,
    )


def write_checkpoint(out: pathlib.Path, model, tokenizer, image_processor, recipe: str,
                     video_processor=None) -> pathlib.Path:
    """Save a float32 checkpoint plus the extras SMG needs; shared by the random and trained builds."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    if video_processor is not None:  # video_preprocessor_config.json (vLLM profiles a video at start)
        video_processor.save_pretrained(out)
    # SMG reads these two from config.json to find the pad token it expands `<image>` into.
    raw = json.loads((out / "config.json").read_text())
    raw["vision_token_id"] = model.config.image_token_id
    raw["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    # SMG sizes images from these two keys and ignores the `size` block.
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre["min_pixels"], pre["max_pixels"] = pre["size"]["shortest_edge"], pre["size"]["longest_edge"]
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (out / "RECIPE").write_text(recipe + "\n")
    return out


def build(out: pathlib.Path) -> pathlib.Path:
    """Write config, weights (float32), tokenizer and image-processor config to `out`."""
    tokenizer = build_tokenizer(VOCAB_SIZE)
    config = build_config(tokenizer)
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    return write_checkpoint(out, model, tokenizer, build_image_processor(), RECIPE_VERSION, _video_processor_14())


def _video_processor_14() -> Qwen2VLVideoProcessor:
    """Qwen2-VL's and Qwen2.5-VL's: frames of 56x56 .. ~448x448 pixels (each frame's pixels, as for images)."""
    return Qwen2VLVideoProcessor(size={"shortest_edge": 4 * 28 * 28, "longest_edge": 256 * 28 * 28},
                                 patch_size=14, temporal_patch_size=2, merge_size=2)


def _text_config(tokenizer, **overrides) -> dict:
    """The decoder every family shares: 128 wide, 2 layers, head_dim 64 (vLLM's CPU attention)."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        initializer_range=0.1,  # sharper next-token distributions than 0.02: fewer near-ties
    ) | overrides


def _token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def build_qwen2_5_vl(out: pathlib.Path) -> pathlib.Path:
    """Qwen2.5-VL: window attention in the vision tower (one windowed block, one full), RMSNorm, SwiGLU."""
    tokenizer = build_tokenizer(VOCAB_SIZE)
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            window_size=56, fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=0.1,
        ),
        tie_word_embeddings=False, **_token_ids(tokenizer),
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(SEED)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    return write_checkpoint(out, model, tokenizer, build_image_processor(), "qwen2.5-vl-random-2", _video_processor_14())


def build_qwen3_vl(out: pathlib.Path) -> pathlib.Path:
    """Qwen3-VL: interleaved M-RoPE, learned vision position embeddings, deepstack, 16-pixel patches.
    Its chat template writes `<|image_pad|>` (SMG's Qwen3-VL spec expands that token)."""
    tokenizer = build_tokenizer(VOCAB_SIZE)
    tokenizer.chat_template = tokenizer.chat_template.replace("<image>", "<|image_pad|>").replace("<video>", "<|video_pad|>")
    config = Qwen3VLConfig(
        text_config=_text_config(tokenizer, head_dim=64, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [12, 10, 10], "mrope_interleaved": True}),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
            patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            num_position_embeddings=64, deepstack_visual_indexes=[0], initializer_range=0.1,
        ),
        tie_word_embeddings=False, **_token_ids(tokenizer),
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    # Qwen3-VL's video size bounds count all frames' pixels (t*h*w); fps 2 is what SMG reads.
    video = Qwen3VLVideoProcessor(size={"shortest_edge": 8 * 32 * 32, "longest_edge": 1024 * 32 * 32},
                                  patch_size=16, temporal_patch_size=2, merge_size=2, fps=2, do_sample_frames=False)
    return write_checkpoint(out, model, tokenizer, build_image_processor(patch_size=16, mean_std=0.5),
                            "qwen3-vl-random-2", video)


# family -> (builder, default folder); the folder names carry what SMG matches on.
FAMILIES = {
    "qwen2_vl": (build, "models/tiny-qwen2-vl"),
    "qwen2_5_vl": (build_qwen2_5_vl, "models/tiny-qwen2.5-vl"),
    "qwen3_vl": (build_qwen3_vl, "models/tiny-qwen3-vl"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", choices=list(FAMILIES), default="qwen2_vl")
    parser.add_argument("--out", type=pathlib.Path, help="default: models/tiny-<family>")
    args = parser.parse_args()
    builder, folder = FAMILIES[args.family]
    print(f"tiny {args.family} written to {builder(args.out or pathlib.Path(folder))}")


if __name__ == "__main__":
    main()
