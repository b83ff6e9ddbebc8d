"""Qwen3-VL: 16-pixel patches; a video is per-frame blocks, each a `<t seconds>` stamp (t the middle of the
step's two frames), <|vision_start|>, the frame's pads, <|vision_end|>. vLLM's interleaved M-RoPE finds each
frame's start marker from the placeholder range's offset, and the frames' embeddings by the pad token id.

vLLM serves the MoE variant and Qwen3.5 with the same multimodal processor; only Qwen3-VL is tested here.
"""

import dataclasses

from engine_adapter.families import qwen2_vl
from engine_adapter.families.base import TinyRecipe

FAMILY = dataclasses.replace(
    qwen2_vl.FAMILY,
    name="Qwen3-VL",
    architectures=(
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration",
    ),
    model_types=("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"),
    frame_stamp="<{:.1f} seconds>",
    stamp_at=0.25,  # (k + 1/4) steps: the mean of frames 2k and 2k+1 at two frames per step
    tiny=TinyRecipe(
        folder="models/tiny-qwen3-vl",
        version="qwen3-vl-random-2",
        text={
            "head_dim": 64,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [12, 10, 10],
                "mrope_interleaved": True,
            },
        },
        # Learned vision position embeddings and deepstack.
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=128,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
            initializer_range=0.1,
        ),
        image_processor={"patch_size": 16, "mean_std": 0.5},
        # Its video size bounds count all frames' pixels (t*h*w); fps 2 is what SMG reads.
        video_processor=(
            "Qwen3VLVideoProcessor",
            dict(
                size={"shortest_edge": 8 * 32 * 32, "longest_edge": 1024 * 32 * 32},
                patch_size=16,
                temporal_patch_size=2,
                merge_size=2,
                fps=2,
                do_sample_frames=False,
            ),
        ),
        template_writes_pads=True,  # SMG's Qwen3-VL spec expands <|image_pad|>, not <image>
    ),
)
