"""Qwen2-VL: 14-pixel patches, 2x2 merge into one embedding, M-RoPE over (time, height, width); a video is
one run of pad tokens, like an image with a time axis."""

from engine_adapter.families.base import Family, Fields, TinyRecipe, Token, Tokens

TOKENS = Tokens(
    image_pad=Token("<|image_pad|>", "image_token_id"),
    video_pad=Token("<|video_pad|>", "video_token_id"),
    vision_start=Token("<|vision_start|>", "vision_start_token_id"),
    vision_end=Token("<|vision_end|>", "vision_end_token_id"),
)

FAMILY = Family(
    name="Qwen2-VL",
    architectures=("Qwen2VLForConditionalGeneration",),
    model_types=("qwen2_vl",),
    tokens=TOKENS,
    image=Fields(pixels="pixel_values", grid="image_grid_thw"),
    video=Fields(pixels="pixel_values_videos", grid="video_grid_thw"),
    vision_keys=("patch_size", "temporal_patch_size", "in_channels", "spatial_merge_size"),
    frame_stamp=None,
    tiny=TinyRecipe(
        folder="models/tiny-qwen2-vl",
        version="qwen2-vl-random-2",
        text={"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}},
        vision=dict(
            depth=2,
            embed_dim=32,
            hidden_size=128,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            initializer_range=0.1,
        ),
        image_processor={"patch_size": 14},
        # Frames of 56x56 .. ~448x448 pixels (each frame's pixels, as for images).
        video_processor=(
            "Qwen2VLVideoProcessor",
            dict(
                size={"shortest_edge": 4 * 28 * 28, "longest_edge": 256 * 28 * 28},
                patch_size=14,
                temporal_patch_size=2,
                merge_size=2,
            ),
        ),
    ),
)
