"""Identities and pad values: deterministic, in-vocabulary, image-specific."""

from types import SimpleNamespace

import torch

from engine_adapter.families import by_model_type
from engine_adapter.types import MediaItem
from servicer.identity import image_identity, pad_values
from servicer.image_store import ImageStore
from servicer.multimodal import ImagePolicy, engine_prompt_ids
from servicer.shm import ConsumedSegments

CANDIDATES = tuple(range(10, 400))
INFO = SimpleNamespace(family=by_model_type("qwen2_vl"))  # the one ModelInfo field pad values read


def test_identity_depends_on_bytes_dtype_shape_and_grid():
    a = torch.arange(2 * 12, dtype=torch.uint8).reshape(2, 12)
    assert image_identity(a, (1, 1, 2)) == image_identity(a.clone(), (1, 1, 2))
    assert len({
        image_identity(a, (1, 1, 2)),
        image_identity(a.to(torch.float32), (1, 1, 2)),
        image_identity(a.reshape(4, 6), (1, 1, 2)),
        image_identity(a, (1, 2, 1)),
        image_identity(a.flip(0), (1, 1, 2)),
    }) == 5


def test_pad_values_are_deterministic_in_vocab_and_vary():
    pads = pad_values("a" * 32, 64, CANDIDATES)
    assert pads == pad_values("a" * 32, 64, CANDIDATES)
    assert set(pads) <= set(CANDIDATES) and len(set(pads)) > 32  # varies along the run
    other = pad_values("b" * 32, 64, CANDIDATES)
    assert sum(x == y for x, y in zip(pads, other)) < 8  # two images differ almost everywhere


def _image(identity, offset, length, is_embed=None):
    return MediaItem(torch.zeros(1), (1, 2, 2), identity, offset, length, is_embed)


def test_engine_ids_replace_only_embedding_positions():
    policy = ImagePolicy(trust_gateway_hashes=False, pad_values=True, pad_candidates=CANDIDATES, store=ImageStore(0), consumed=ConsumedSegments())
    ids = [1, 2, 9, 9, 9, 3, 9, 9, 4]
    out = engine_prompt_ids(ids, [_image("x", 2, 3), _image("y", 5, 3, (False, True, True))], policy, INFO)
    assert out[:2] == [1, 2] and out[5] == 3 and out[8] == 4
    assert out[2:5] == pad_values("x", 3, CANDIDATES) and out[6:8] == pad_values("y", 2, CANDIDATES)
    off = ImagePolicy(trust_gateway_hashes=False, pad_values=False, pad_candidates=CANDIDATES, store=ImageStore(0), consumed=ConsumedSegments())
    assert engine_prompt_ids(ids, [_image("x", 2, 3)], off, INFO) == ids
