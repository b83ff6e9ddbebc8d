"""Name and clean up vLLM's shared-memory object store (`--mm-processor-cache-type shm`).

With that cache vLLM's front end writes each multimodal item once per identity into a
POSIX shared-memory ring that every tensor-parallel rank maps; requests then carry
only the item's address. vLLM names the ring from `VLLM_OBJECT_STORAGE_SHM_BUFFER_NAME`
(by default a random name, which nothing can later tie to a dead process). We give it
a per-process name, and a starting servicer removes rings whose owning process is gone
(a crashed servicer leaves its ring behind in /dev/shm). A request refused for want of
room gives back the holds it took (release_holds).
"""

import logging
import os
import re

logger = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"
ENV = "VLLM_OBJECT_STORAGE_SHM_BUFFER_NAME"
_OURS = re.compile(r"vlm-servicer-(\d+)-mm")


def ring_name(pid: int) -> str:
    return f"vlm-servicer-{pid}-mm"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_rings(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink rings of ours whose process no longer exists; return their names."""
    swept = []
    for name in os.listdir(shm_dir):
        found = _OURS.fullmatch(name)
        if found and not _alive(int(found.group(1))):
            try:
                os.unlink(os.path.join(shm_dir, name))
                swept.append(name)
            except FileNotFoundError:
                pass
    if swept:
        logger.warning("removed %d shared-memory rings left by dead servicers: %s", len(swept), swept)
    return swept


def claim_ring_name() -> str:
    """Name this process's ring (unless the operator named it); vLLM's processes inherit it."""
    sweep_dead_rings()
    return os.environ.setdefault(ENV, ring_name(os.getpid()))


def hold_id(item) -> int:
    """The writer hold an item vLLM's sender cache returned for the ring carries (its address item's id)."""
    return item["monotonic_id"].data


def release_holds(sender_cache, monotonic_ids) -> None:
    """Give back holds a refused request took on ring items. Each write or lookup of an item takes one,
    and the ring frees an item only once its ranks have read it as often; a refused request's items are
    never read. vLLM 0.32 has no public release: the holds are its store's private writer flags (pinned
    by tests/test_vllm_private.py)."""
    flags = sender_cache._shm_cache.writer_flag
    for monotonic_id in monotonic_ids:
        flags[monotonic_id] -= 1
