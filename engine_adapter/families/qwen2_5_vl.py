"""Qwen2.5-VL: Qwen2-VL's tokens and grid; its M-RoPE gives video frames time positions from the seconds
per temporal grid step (`second_per_grid_ts`; without it vLLM falls back to 1 s per step)."""

import dataclasses

from engine_adapter.families import qwen2_vl
from engine_adapter.families.base import Fields, TinyRecipe

FAMILY = dataclasses.replace(
    qwen2_vl.FAMILY,
    name="Qwen2.5-VL",
    architectures=("Qwen2_5_VLForConditionalGeneration",),
    model_types=("qwen2_5_vl",),
    video=Fields(pixels="pixel_values_videos", grid="video_grid_thw", seconds="second_per_grid_ts"),
    tiny=TinyRecipe(
        folder="models/tiny-qwen2.5-vl",
        version="qwen2.5-vl-random-2",
        text=qwen2_vl.FAMILY.tiny.text,
        # Window attention (one windowed block, one full), RMSNorm and SwiGLU in the vision tower.
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=128,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            initializer_range=0.1,
        ),
        image_processor=qwen2_vl.FAMILY.tiny.image_processor,
        video_processor=qwen2_vl.FAMILY.tiny.video_processor,
    ),
)
