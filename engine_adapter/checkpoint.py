"""Can a checkpoint replace the running one in place? Checked before any weight is touched.

vLLM's in-place reload loads tensors into the model it already built, layer by layer; a tensor of
another shape fails halfway through, with some layers already replaced. So a refit is refused
unless the new folder has the same architecture and config (the engine keeps running the old
config) and exactly the same tensor names and shapes, in complete safetensors files. Dtypes may
differ: the loader casts to the engine's dtype.
"""

import json
import pathlib

from safetensors import SafetensorError, safe_open

from engine_adapter.errors import EngineRequestError

# Config keys that describe how a file was written, not the model it holds.
_NOT_ARCHITECTURE = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"})


def _config(folder: pathlib.Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineRequestError(f"model_path: {folder} has no config.json") from None
    except (OSError, ValueError) as exc:
        raise EngineRequestError(f"model_path: {path} is not readable JSON: {exc}") from None


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ, ignoring how the file was written."""
    differences = []
    for key in sorted(old.keys() | new.keys()):
        if key in _NOT_ARCHITECTURE:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return differences


def tensor_shapes(folder: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape across the folder's safetensors files (headers only; files must be complete)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EngineRequestError(f"model_path: {folder} has no .safetensors files (in-place refits load safetensors)")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise EngineRequestError(f"model_path: {file.name} is not a complete safetensors file: {exc}") from None
    return shapes


def check_replaceable(current: str, candidate: str) -> pathlib.Path:
    """Raise EngineRequestError (naming what differs) unless `candidate` can be loaded over `current`."""
    new = pathlib.Path(candidate)
    if not new.is_absolute():
        raise EngineRequestError(
            f"model_path: {candidate!r} must be an absolute path (the engine's working directory is not the caller's)"
        )
    if not new.is_dir():
        raise EngineRequestError(f"model_path: {candidate} is not a directory on this worker")
    old = pathlib.Path(current)
    if differences := _config_differences(_config(old), _config(new)):
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise EngineRequestError(f"model_path: {candidate}'s config.json differs from the running model's: {shown}")
    old_shapes, new_shapes = tensor_shapes(old), tensor_shapes(new)
    missing = sorted(old_shapes.keys() - new_shapes.keys())
    extra = sorted(new_shapes.keys() - old_shapes.keys())
    reshaped = sorted(n for n in old_shapes.keys() & new_shapes.keys() if old_shapes[n] != new_shapes[n])
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unknown tensors (e.g. {extra[0]})")
    if reshaped:
        name = reshaped[0]
        problems.append(
            f"{len(reshaped)} tensors of another shape (e.g. {name} {list(new_shapes[name])}, "
            f"running {list(old_shapes[name])})"
        )
    if problems:
        raise EngineRequestError(f"model_path: {candidate} does not match the running model: {'; '.join(problems)}")
    return new
