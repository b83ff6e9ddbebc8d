"""What the engines' caches did in a benchmark cell, and requests whose images no cache can hold.

Every Generate answer carries its prompt and cached token counts. A cell of ours that claims to measure work
done from scratch sends each request its own pixels (and so its own identity on both servers) and holds the
answers to zero cached tokens; a cell where a cache helps says so and shows the counts beside its figures."""

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from vlm_proto import vllm_engine_pb2 as pb


class CacheHit(RuntimeError):
    """A cell that claims no cache helped got answers with cached tokens."""


@dataclass
class CacheTally:
    """Cached and prompt tokens over a cell's answers."""

    responses: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    hits: int = 0  # answers with any cached token

    def add(self, cached: int, prompt: int) -> None:
        self.responses += 1
        self.prompt_tokens += prompt
        self.cached_tokens += cached
        self.hits += cached > 0

    def add_complete(self, done: pb.GenerateComplete) -> None:
        """A call's `complete` message."""
        self.add(done.cached_tokens, done.prompt_tokens)

    def add_message(self, raw: bytes) -> None:
        """A serialized GenerateResponse, the last of a call (its `complete`)."""
        self.add_complete(pb.GenerateResponse.FromString(raw).complete)

    def __add__(self, other: "CacheTally") -> "CacheTally":
        return CacheTally(self.responses + other.responses, self.prompt_tokens + other.prompt_tokens,
                          self.cached_tokens + other.cached_tokens, self.hits + other.hits)

    def require_none(self, cell: str) -> None:
        if self.cached_tokens:
            raise CacheHit(f"{cell}: {self.hits} of {self.responses} answers had cached tokens "
                           f"({self.cached_tokens} of {self.prompt_tokens} prompt tokens), in a cell that claims "
                           "no cache helps")

    def __str__(self) -> str:
        return f"{self.cached_tokens}/{self.prompt_tokens}"

    @classmethod
    def from_dict(cls, d: dict) -> "CacheTally":
        return cls(d["responses"], d["prompt_tokens"], d["cached_tokens"], d["responses_with_cached_tokens"])

    @classmethod
    def total(cls, saved: Iterable[dict]) -> "CacheTally":
        """The sum of tallies saved with as_dict (a cell's rounds, say)."""
        return sum((cls.from_dict(d) for d in saved), cls())

    def as_dict(self) -> dict:
        return {"responses": self.responses, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "responses_with_cached_tokens": self.hits}


def make_distinct(req: pb.GenerateRequest, serial: int) -> None:
    """Give a one-image, inline-pixel request pixels no other request has: `serial` (unique per run, never 0) in its first
    8 bytes, and the gateway's hash recomputed from the bytes (SMG hashes the content). Neither server can then
    reuse an encoder output or a KV block across requests; the engine's work is the same for any pixel values."""
    td = req.mm_inputs.pixel_values
    data = bytearray(td.inline)
    data[:8] = serial.to_bytes(8, "little")
    td.inline = bytes(data)
    req.mm_inputs.mm_hashes[:] = [hashlib.sha256(data).hexdigest()]
