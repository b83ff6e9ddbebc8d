"""Build the deterministic random-weight tiny Qwen2-VL checkpoint.

Shaped for the CPU engine (decoder head_dim 64) and for SMG's Qwen-VL spec:
`model_type: qwen2_vl`, `vision_token_id` = `<|image_pad|>`, `<image>` in the
vocabulary, `min_pixels`/`max_pixels` in the image-processor config.
"""

import argparse
import json
import pathlib

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

from tinyvlm.tokenizer import build_tokenizer

VOCAB_SIZE = 1024
SEED = 1234
# Bump when anything below changes, so `make` rebuilds stale checkpoints.
RECIPE_VERSION = "qwen2-vl-random-1"


def build_config(tokenizer, text: dict | None = None, vision: dict | None = None) -> Qwen2VLConfig:
    """The tiny config; `text`/`vision` override sub-config fields (the trained checkpoint
    widens the vision tower). The decoder's head_dim must stay 64 for vLLM's CPU attention."""
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            initializer_range=0.1,  # sharper next-token distributions than 0.02: fewer near-ties
        ) | (text or {}),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            initializer_range=0.1,
        ) | (vision or {}),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    return config


def build_image_processor() -> Qwen2VLImageProcessorPil:
    # 56x56 .. 1280x1280-ish: a 112x112 image is 8x8 patches, 16 placeholder tokens.
    return Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=28 * 28 * 2048,
        patch_size=14, temporal_patch_size=2, merge_size=2,
    )


def write_checkpoint(out: pathlib.Path, model, tokenizer, image_processor, recipe: str) -> pathlib.Path:
    """Save a float32 checkpoint plus the extras SMG needs; shared by the random and trained builds."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
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
    return write_checkpoint(out, model, tokenizer, build_image_processor(), RECIPE_VERSION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("models/tiny-qwen2-vl"))
    args = parser.parse_args()
    print(f"tiny Qwen2-VL written to {build(args.out)}")


if __name__ == "__main__":
    main()
