"""What the servicer knows about one model family, as plain data: a frozen `Family` per family module.

No vLLM, transformers or gRPC here, so tinyvlm/ and tests/ read it too. engine_adapter resolves the
served model to its Family (families.family_for) and hands it over in ModelInfo.family; the servicer
reads it there. The model's own vLLM code stays the authority on tensor layout (its field config) and
on pixel normalisation (vLLM's per-model device norm); a family names what the servicer must add.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Token:
    """A placeholder or boundary token: its text, and the checkpoint config field that holds its id."""

    text: str
    config_key: str


@dataclass(frozen=True)
class Tokens:
    image_pad: Token  # one per image embedding
    video_pad: Token  # one per video embedding
    vision_start: Token  # opens an image or video (and, in frame layouts, each frame)
    vision_end: Token

    def __iter__(self):
        return iter((self.image_pad, self.video_pad, self.vision_start, self.vision_end))


@dataclass(frozen=True)
class Fields:
    """One modality's tensors, named as the model's vLLM field config names them."""

    pixels: str  # flat patch rows, t*h*w per item
    grid: str  # [t, h, w] per item, in patches
    seconds: str | None = None  # seconds per temporal grid step, where the model's M-RoPE reads it


@dataclass(frozen=True)
class TinyRecipe:
    """The family's deterministic random-weight tiny checkpoint, built by tinyvlm/build.py.

    Transformers classes are named, not imported (this module stays import-free); the decoder and the
    tokenizer are shared by every family (tinyvlm/build.py, tinyvlm/tokenizer.py).
    """

    folder: str  # from the repository root; SMG recognises the family by this folder's name
    version: str  # written to RECIPE; bump it with any change here
    text: dict  # text-config fields over the shared tiny decoder
    vision: dict  # the vision config
    image_processor: dict  # tinyvlm.build.build_image_processor's arguments
    video_processor: tuple[str, dict]  # transformers class name and its arguments
    template_writes_pads: bool = False  # chat template writes <|image_pad|> (not <image>), as SMG's spec for it expects


@dataclass(frozen=True)
class Family:
    """One model family: its tokens, grid and video rules, what M-RoPE needs, its tensor names, its tiny model."""

    name: str  # as people write it
    architectures: tuple[str, ...]  # vLLM/HF architecture names it covers (the first: the tiny checkpoint's)
    model_types: tuple[str, ...]  # HF config model_type values it covers
    tokens: Tokens
    image: Fields
    video: Fields
    # Grid: an item is t x h x w patches of `patch_dim` values; merge x merge neighbouring patches make one
    # embedding. Vision-config field names: patch side, frames per temporal patch, channels, merge size.
    vision_keys: tuple[str, str, str, str]
    # Video: None = one run of pad tokens. Else a per-frame layout: for each temporal step, this stamp
    # (formatted with the step's time in seconds, `stamp_at` of the way into it), <vision_start>, the step's
    # pads, <vision_end>. vLLM's M-RoPE then finds each frame's start marker from the range's offset, and the
    # frames' embeddings by the pad token id.
    frame_stamp: str | None
    tiny: TinyRecipe
    stamp_at: float = 0.0

    def token_ids(self, hf_config) -> dict[str, int | None]:
        """Placeholder and boundary token ids, by Tokens field name, from the checkpoint's config."""
        return {
            name: getattr(hf_config, tok.config_key, None)
            for name, tok in zip(("image_pad", "video_pad", "vision_start", "vision_end"), self.tokens)
        }

    def merge_size(self, vision_config) -> int:
        return int(getattr(vision_config, self.vision_keys[3]))

    def patch_dim(self, vision_config) -> int:
        """Values per pixel-patch row: channels * frames per temporal patch * patch side^2."""
        side, frames, channels, _ = (getattr(vision_config, k) for k in self.vision_keys)
        return channels * frames * side * side

    def fields(self, modality: str) -> Fields:
        return self.image if modality == "image" else self.video

    @staticmethod
    def embeddings(grid_thw: Sequence[int], merge: int) -> int:
        """Embeddings (so pad tokens) one item's grid makes."""
        t, h, w = grid_thw
        return t * h * w // (merge * merge)

    @property
    def video_frames(self) -> bool:
        """Videos are per-frame blocks; their placeholder ranges keep the markers (M-RoPE reads the frames'
        starts from the offset) and their pad ids stay (vLLM finds the frames' embeddings by them)."""
        return self.frame_stamp is not None

    def stamp_text(self, seconds: float) -> str:
        """A frame's timestamp, as the family's processor writes it (a family with video_frames only)."""
        assert self.frame_stamp is not None, f"{self.name} stamps no video frames"
        return self.frame_stamp.format(seconds)

    def video_tokens(
        self,
        grid_thw: Sequence[int],
        merge: int,
        seconds_per_step: float,
        pad_id: int,
        start_id: int,
        end_id: int,
        stamp_ids: Callable[[float], Sequence[int]],
    ) -> list[int]:
        """What one video placeholder stands for under a frame layout. `stamp_ids(seconds)` is stamp_text
        encoded on its own, as vLLM encodes it, so a stamp never merges with neighbouring text."""
        t, h, w = grid_thw
        out: list[int] = []
        for k in range(t):
            out += [
                *stamp_ids((k + self.stamp_at) * seconds_per_step),
                start_id,
                *[pad_id] * (h * w // (merge * merge)),
                end_id,
            ]
        return out
