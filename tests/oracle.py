"""Hugging Face transformers as the correctness oracle: same ids, same pixels, float32.

The model class comes from the checkpoint's config (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.video_utils import VideoMetadata

from tests.fixtures import MODEL


@dataclass
class Images:
    """One or more images as a gateway sends them: normalized floats and raw uint8 patches."""

    pixel_values: torch.Tensor  # float32, normalized (HF's output)
    raw: torch.Tensor  # uint8, same patches before rescale/normalize
    grid: torch.Tensor  # [n, 3] int64

    @property
    def tokens_per_image(self) -> list[int]:
        return (self.grid.prod(-1) // 4).tolist()


@dataclass
class Videos:
    """One or more videos as a gateway sends them (one batch), with their time step."""

    pixel_values: torch.Tensor  # float32, normalized (SMG sends video as floats)
    grid: torch.Tensor  # [n, 3] int64
    seconds_per_grid: torch.Tensor  # [n] float32: temporal_patch_size / fps

    @property
    def tokens_per_video(self) -> list[int]:
        return (self.grid.prod(-1) // 4).tolist()


class Oracle:
    def __init__(self, path=MODEL):
        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        tid = self.tokenizer.convert_tokens_to_ids
        self.pad, self.vs, self.ve = tid("<|image_pad|>"), tid("<|vision_start|>"), tid("<|vision_end|>")
        self.video_pad = tid("<|video_pad|>")
        self.family = self.model.config.model_type
        # Whether the model's M-RoPE reads seconds per temporal grid step (its own forward's say).
        self.takes_seconds = "second_per_grid_ts" in inspect.signature(type(self.model).forward).parameters

    def images(self, pil_images) -> Images:
        proc = self.processor.image_processor
        norm = proc(images=pil_images, return_tensors="pt")
        raw = proc(images=pil_images, return_tensors="pt", do_rescale=False, do_normalize=False)
        assert torch.equal(raw["pixel_values"], raw["pixel_values"].round()), "resized pixels must be integers"
        return Images(norm["pixel_values"].to(torch.float32), raw["pixel_values"].to(torch.uint8),
                      norm["image_grid_thw"].to(torch.int64))

    def videos(self, clips: list[np.ndarray], fps: float = 2.0) -> Videos:
        """clips: [frames, height, width, 3] uint8 arrays, frames a multiple of temporal_patch_size."""
        proc = self.processor.video_processor
        out = proc(videos=clips, return_tensors="pt", do_sample_frames=False)
        seconds = torch.full((len(clips),), proc.temporal_patch_size / fps, dtype=torch.float32)
        return Videos(out["pixel_values_videos"].to(torch.float32), out["video_grid_thw"].to(torch.int64), seconds)

    def image_block(self, tokens: int = 1) -> list[int]:
        return [self.vs] + [self.pad] * tokens + [self.ve]

    def video_block(self, videos: Videos, i: int, expanded: bool = True) -> list[int]:
        """Video i as the family's HF processor expands it (Qwen3-VL: a timestamp and markers per temporal
        step), inside the template's outer markers; its frames taken at the rate its time step implies."""
        if not expanded:
            return [self.vs, self.video_pad, self.ve]
        frames = int(videos.grid[i][0]) * self.processor.video_processor.temporal_patch_size
        fps = self.processor.video_processor.temporal_patch_size / float(videos.seconds_per_grid[i])
        meta = VideoMetadata(total_num_frames=frames, fps=fps, frames_indices=list(range(frames)))
        text = self.processor.replace_video_token({"video_grid_thw": videos.grid[i:i + 1], "video_metadata": [meta]}, 0)
        return [self.vs] + self.tokenizer.encode(text, add_special_tokens=False) + [self.ve]

    def prompt(self, text: str, blocks: list[list[int]], prefix: str = "") -> tuple[list[int], list[int]]:
        """The chat prompt: `prefix` text, the image/video blocks, then `text`; and where each block starts."""
        enc = lambda s: self.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        ids = enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + prefix)
        starts = []
        for block in blocks:
            starts.append(len(ids))
            ids = ids + block
        return ids + enc(text + "<|im_end|>\n<|im_start|>assistant\n"), starts

    def chat_ids(self, text: str, num_images: int = 0, expand: list[int] | None = None, prefix: str = "") -> list[int]:
        """The chat prompt with `num_images` images, each <|vision_start|> pad(s) <|vision_end|>."""
        blocks = [self.image_block(expand[i] if expand else 1) for i in range(num_images)]
        return self.prompt(text, blocks, prefix)[0]

    def _inputs(self, ids: list[int], images: Images | None, videos: Videos | None) -> dict:
        input_ids = torch.tensor([ids])
        kwargs = {"input_ids": input_ids}
        if images is not None:
            kwargs |= {"pixel_values": images.pixel_values, "image_grid_thw": images.grid}
        if videos is not None:
            kwargs |= {"pixel_values_videos": videos.pixel_values, "video_grid_thw": videos.grid}
            if self.takes_seconds:
                kwargs["second_per_grid_ts"] = videos.seconds_per_grid
        if len(kwargs) > 1:  # mm_token_type_ids: 1 marks image, 2 video positions for HF's M-RoPE
            kwargs["mm_token_type_ids"] = (input_ids == self.pad).to(torch.int64) + 2 * (input_ids == self.video_pad)
        return kwargs

    @torch.no_grad()
    def log_softmax(self, ids: list[int], images: Images | None, videos: Videos | None = None) -> torch.Tensor:
        """[len(ids), vocab] logprobs of the next token at every position."""
        logits = self.model(**self._inputs(ids, images, videos)).logits[0]
        return torch.log_softmax(logits.to(torch.float32), dim=-1)

    @torch.no_grad()
    def embedding(self, ids: list[int], images: Images | None = None) -> torch.Tensor:
        """The last token's final hidden state (after the decoder's norm), L2-normalised: what vLLM's
        pooling runner returns for a generative checkpoint converted to embeddings (LAST pooling)."""
        hidden = self.model.model(**self._inputs(ids, images, None)).last_hidden_state[0, -1].to(torch.float32)
        return torch.nn.functional.normalize(hidden, dim=-1)

    @torch.no_grad()
    def greedy(self, ids: list[int], images: Images | None, n: int, videos: Videos | None = None):
        """Greedy continuation and, per step, the top-2 logprob gap (small = near-tie)."""
        out, gaps = [], []
        for _ in range(n):
            lp = self.log_softmax(ids + out, images, videos)[-1]
            top = torch.topk(lp, 2)
            gaps.append(float(top.values[0] - top.values[1]))
            out.append(int(top.indices[0]))
        return out, gaps
