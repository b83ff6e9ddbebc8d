"""Build the deterministic random-weight tiny checkpoints, one per registered family.

Each family module carries its recipe (engine_adapter/families, `Family.tiny`); every family shares
the decoder below and the byte-level BPE tokenizer (tinyvlm/tokenizer.py). Shaped for the CPU engine
(decoder head_dim 64, M-RoPE sections summing to 32) and for SMG's specs: `vision_token_id` =
`<|image_pad|>` and `<image>` in the vocabulary (its Qwen2/2.5-VL spec), `<|image_pad|>` in the chat
template where the recipe says so, and `min_pixels`/`max_pixels` in the image-processor config. SMG picks
the family's preprocessing from the folder name, so the recipes' folders keep it.
"""

import argparse
import hashlib
import json
import pathlib

from engine_adapter.families import FAMILIES, Family, by_model_type

VOCAB_SIZE = 1024
SEED = 1234
# torch, transformers and the tokenizer are imported where they are used: `make test` runs `--all` every time, and on
# current checkpoints that then returns in well under a second.
DEFAULT = "qwen2_vl"  # the mechanics tests' model, and the random model `vlm-servicer serve` builds
ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def family_config(family: Family, tokenizer, text: dict | None = None, vision: dict | None = None):
    """The family's tiny config; `text`/`vision` override sub-config fields (the trained checkpoint widens
    the vision tower)."""
    from transformers import AutoConfig

    ids = {tok.config_key: tokenizer.convert_tokens_to_ids(tok.text) for tok in family.tokens}
    config = AutoConfig.for_model(
        family.model_types[0],
        text_config=_text_config(tokenizer, **family.tiny.text) | (text or {}),
        vision_config=family.tiny.vision | (vision or {}),
        tie_word_embeddings=False, **ids,
    )
    config.architectures = [family.architectures[0]]
    return config


def build_config(tokenizer, text: dict | None = None, vision: dict | None = None):
    """The default family's tiny config (the trained checkpoint's base)."""
    return family_config(by_model_type(DEFAULT), tokenizer, text, vision)


def build_image_processor(patch_size: int = 14, mean_std: float | None = None):
    from transformers import Qwen2VLImageProcessorPil

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
    import torch

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


def recipe_stamp(family: Family) -> str:
    """What RECIPE records: the recipe's version and a digest of everything that shapes the checkpoint
    (the recipe, this builder, the tokenizer), so a stale checkpoint is seen whether or not the version moved."""
    digest = hashlib.sha256(repr(family.tiny).encode())
    for source in ("tinyvlm/build.py", "tinyvlm/tokenizer.py"):
        digest.update((ROOT / source).read_bytes())
    return f"{family.tiny.version} {digest.hexdigest()[:16]}"


def build_family(family: Family, out: pathlib.Path | None = None) -> pathlib.Path:
    """Write the family's tiny checkpoint (config, float32 weights, tokenizer, image and video processors)."""
    import torch
    import transformers

    from tinyvlm.tokenizer import build_tokenizer

    recipe = family.tiny
    tokenizer = build_tokenizer(VOCAB_SIZE)
    if recipe.template_writes_pads:
        tokenizer.chat_template = tokenizer.chat_template.replace("<image>", "<|image_pad|>").replace("<video>", "<|video_pad|>")
    config = family_config(family, tokenizer)
    torch.manual_seed(SEED)
    model = getattr(transformers, family.architectures[0])(config).to(torch.float32).eval()
    video_class, video_args = recipe.video_processor
    return write_checkpoint(out or ROOT / recipe.folder, model, tokenizer, build_image_processor(**recipe.image_processor),
                            recipe_stamp(family), getattr(transformers, video_class)(**video_args))


def build(out: pathlib.Path) -> pathlib.Path:
    """The default family's tiny checkpoint, written to `out`."""
    return build_family(by_model_type(DEFAULT), out)


def is_current(family: Family, folder: pathlib.Path | None = None) -> bool:
    stamp = (folder or ROOT / family.tiny.folder) / "RECIPE"
    return stamp.exists() and stamp.read_text().strip() == recipe_stamp(family)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [f.model_types[0] for f in FAMILIES]
    parser.add_argument("--family", choices=names, default=DEFAULT)
    parser.add_argument("--out", type=pathlib.Path, help="default: the family's folder (its recipe names it)")
    parser.add_argument("--all", action="store_true", help="every registered family whose checkpoint is missing or stale")
    args = parser.parse_args()
    if args.all:
        for family in FAMILIES:
            if not is_current(family):
                print(f"tiny {family.model_types[0]} written to {build_family(family)}")
        return
    family = by_model_type(args.family)
    print(f"tiny {args.family} written to {build_family(family, args.out)}")


if __name__ == "__main__":
    main()
