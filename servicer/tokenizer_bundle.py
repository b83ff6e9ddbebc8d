"""The engine's tokenizer files as one zip archive, for GetTokenizer (a gateway without the model's folder).

The archive is reproducible: the same files give the same bytes and the same SHA-256 on every
replica and after every restart (sorted names, fixed timestamps), so a gateway can compare digests.
"""

import fnmatch
import hashlib
import io
import pathlib
import zipfile
from dataclasses import dataclass

# What a gateway needs to tokenize, template and preprocess: tokenizer, chat template, the model's
# config (it picks the model family from it), generation defaults and the image/video processors.
PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "*.jinja",
    "config.json",
    "generation_config.json",
    "*processor_config.json",
)
CHUNK_BYTES = 64 * 1024
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest timestamp: the bytes do not depend on file times


@dataclass(frozen=True)
class Bundle:
    data: bytes
    sha256: str
    names: tuple[str, ...]

    def chunks(self):
        """(data, sha256) slices of CHUNK_BYTES; the digest rides on the last one only."""
        for start in range(0, len(self.data), CHUNK_BYTES):
            end = min(start + CHUNK_BYTES, len(self.data))
            yield self.data[start:end], self.sha256 if end == len(self.data) else ""


def build(folder: str) -> Bundle:
    """Zip the tokenizer files at the top of `folder` (blocking file I/O: call off the event loop)."""
    root = pathlib.Path(folder)
    files = (
        sorted(p for p in root.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in PATTERNS))
        if root.is_dir()
        else []
    )
    if not any(p.name.startswith("tokenizer") or p.name.endswith(".tiktoken") for p in files):
        raise FileNotFoundError(f"no tokenizer files in {folder}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for path in files:
            entry = zipfile.ZipInfo(path.name, date_time=_EPOCH)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, path.read_bytes())
    data = buf.getvalue()
    return Bundle(data, hashlib.sha256(data).hexdigest(), tuple(p.name for p in files))
