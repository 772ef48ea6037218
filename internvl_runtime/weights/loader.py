"""Generic, strict checkpoint loading: safetensors (single file or sharded index), memory-mapped.

Tensors are read one at a time, cast to the parameter's dtype and copied onto its device, so peak
memory stays near the model's size in that dtype. Name differences are not handled here: the model
supplies a ``resolve(name) -> (param_name, shard_id, transform)`` function built from its declared
tables (see ``models/decoders/base.py``). Every checkpoint key must resolve, every parameter (and every
shard of a fused one) must be filled, and shapes must agree; otherwise ``WeightMismatchError`` lists
all offending names at once.

Slicing (tensor parallelism): a transform with ``lazy = True`` receives a :class:`LazyTensor` instead of
the tensor, and reads only the rows or columns it needs (``lazy[a:b]``, ``lazy[:, a:b]``); for
safetensors that reads just those bytes from the mapped file, so a rank never materialises a whole
tensor it keeps a slice of. ``skip(param_name)`` names parameters this process does not hold (their
checkpoint tensors are consumed without being read).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, WeightMismatchError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
Transform = Callable[[torch.Tensor], torch.Tensor]
Resolver = Callable[[str], "tuple[str, object, Transform | None] | None"]


def checkpoint_files(folder: str | Path, *, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder, from the index if sharded."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc})") from exc
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(name, str) for name in weight_map.values())):
            raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> file name")
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickled = sorted(folder.glob("pytorch_model*.bin"))
    if pickled:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} holds only pickled weights ({pickled[0].name}); loading pickles can run code. "
                "Convert them to safetensors, or pass allow_pickle=True to load them with weights_only=True.")
        return pickled
    raise CheckpointError(f"{folder} has no weights: expected {SINGLE_FILE} or {INDEX_FILE} (+ shards)")


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) lazily; safetensors tensors are memory-mapped views until copied."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        if file.suffix == ".bin":
            try:  # weights_only refuses any pickle that would run code
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"{file}: cannot load pickled weights with weights_only=True ({exc})") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: expected a state dict, got {type(state).__name__}")
            yield from state.items()
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            if isinstance(exc, WeightMismatchError):
                raise
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc


class LazyTensor:
    """One checkpoint tensor, not yet read: ``shape``, ``[index]`` (reads only that part) and ``load()``."""

    def __init__(self, file: Path, name: str, source: object) -> None:
        self.file, self.name, self._source = file, name, source   # a safetensors slice or a tensor

    @property
    def shape(self) -> tuple[int, ...]:
        src = self._source
        return tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())  # type: ignore[attr-defined]

    def __getitem__(self, index: object) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._source[index]  # type: ignore[index]
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"{self.file}: cannot read {self.name} ({exc})") from exc

    def load(self) -> torch.Tensor:
        return self[...] if isinstance(self._source, torch.Tensor) else self[:]


def iter_checkpoint_lazy(files: list[Path]) -> Iterator[tuple[str, LazyTensor]]:
    """Like :func:`iter_checkpoint`, but yields unread :class:`LazyTensor` s (valid until the next one)."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        if file.suffix == ".bin":
            for name, tensor in iter_checkpoint([file]):
                yield name, LazyTensor(file, name, tensor)
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    yield name, LazyTensor(file, name, handle.get_slice(name))
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc


def load_weights(model: nn.Module, files: list[Path], resolve: Resolver,
                 optional: Callable[[str], bool] = lambda name: False,
                 skip: Callable[[str], bool] = lambda name: False) -> set[str]:
    """Copy every checkpoint tensor into ``model``; raise WeightMismatchError naming all problems.

    ``optional(param_name)`` marks parameters that may be absent from the checkpoint (tied heads).
    Returns the set of checkpoint names consumed.
    """
    params = dict(model.named_parameters(remove_duplicate=False))

    def shard_offsets(param_name: str) -> dict[object, tuple[int, int]] | None:
        owner = param_name.rpartition(".")[0]
        return getattr(model.get_submodule(owner), "shard_offsets", None) if owner else None

    filled: dict[str, set[object]] = {}
    unexpected, misshaped, consumed = [], [], set()
    with torch.no_grad():
        for name, lazy in iter_checkpoint_lazy(files):
            target = resolve(name)
            if target is None or target[0] not in params:
                unexpected.append(name)
                continue
            param_name, shard_id, transform = target
            if skip(param_name):
                consumed.add(name)
                continue
            param = params[param_name]
            if transform is None:
                tensor = lazy.load()
            elif getattr(transform, "lazy", False):
                tensor = transform(lazy)
            else:
                tensor = transform(lazy.load())
            dest = param.data
            if shard_id is not None:
                offsets = shard_offsets(param_name)
                if offsets is None or shard_id not in offsets:
                    unexpected.append(name)
                    continue
                start, size = offsets[shard_id]
                dest = dest.narrow(0, start, size)
            if tuple(tensor.shape) != tuple(dest.shape):
                misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dest.shape)}")
                continue
            dest.copy_(tensor.to(dtype=dest.dtype))
            filled.setdefault(param_name, set()).add(shard_id)
            consumed.add(name)

    missing = []
    for param_name, param in params.items():
        offsets = shard_offsets(param_name)
        got = filled.get(param_name, set())
        if None in got or skip(param_name):
            continue
        if offsets is not None and got and set(offsets) <= got:
            continue
        if optional(param_name):
            continue
        if offsets is not None and got:
            missing.append(f"{param_name} (shards {sorted(map(str, set(offsets) - got))})")
        else:
            missing.append(param_name)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:20])}")
        if misshaped:
            parts.append(f"misshaped {len(misshaped)}: {'; '.join(misshaped[:20])}")
        raise WeightMismatchError(f"checkpoint {files[0].parent} does not match the model: " + " | ".join(parts))
    return consumed
