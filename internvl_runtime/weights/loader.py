"""Generic, strict checkpoint loading: safetensors (single file or sharded index), tensor by tensor.

Tensors are read one at a time (each into its own buffer), cast to the parameter's dtype and handed to
a sink that puts them in place, or, where the sink takes a whole tensor as it is stored (``WeightSink.adopt``:
``DirectSink`` on the CPU), viewed read-only from the file's mapping (``weights.mapping``).
:class:`WeightSink` copies into the parameters as they are allocated; ``weights.direct.DirectSink``
allocates each module on its device when its first tensor arrives and can swap a module once complete
(quantization), so host memory stays at about one tensor.
The loader keeps only shapes and shard offsets of the model's parameters, never a reference to their
tensors, so a module the sink replaces is freed at once. Name differences are not handled here: the model
supplies a ``resolve(name) -> (param_name, shard_id, transform)`` function built from its declared
tables (see ``models/decoders/base.py``). Every checkpoint key must resolve, every parameter (and every
shard of a fused one) must be filled, and shapes must agree; otherwise ``WeightMismatchError`` lists
all offending names at once.

Slicing (tensor parallelism): a :class:`LazyTransform` receives a :class:`LazyTensor` instead of
the tensor, and reads only the rows or columns it needs (``lazy[a:b]``, ``lazy[:, a:b]``); for
safetensors that reads just those bytes from the mapped file, so a rank never materialises a whole
tensor it keeps a slice of. ``skip(param_name)`` names parameters this process does not hold (their
checkpoint tensors are consumed without being read); a resolver that knows a single checkpoint tensor is not
this process's (another rank's expert, stacked into a parameter this rank holds its own experts of) resolves
it to ``ELSEWHERE``: consumed, never read.

Progress: ``load_weights(..., progress=hook)`` calls ``hook(nbytes)`` once per checkpoint tensor, after it
is handled, with the bytes it takes in the checkpoint (read whole, sliced or skipped alike), so a bar
over :func:`checkpoint_nbytes` ends at exactly its total.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, WeightMismatchError
from .mapping import FileMappings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
Transform = Callable[[torch.Tensor], torch.Tensor]
Resolver = Callable[[str], "tuple[str, object, Transform | LazyTransform | None] | None"]

#: What a resolver returns for a checkpoint tensor another process holds (see the module docstring).
ELSEWHERE: tuple[str, object, None] = ("<held by another process>", None, None)
Progress = Callable[[int], None]


@dataclass(frozen=True)
class LazyTransform:
    """A transform that reads only the part of a checkpoint tensor it needs (``read(lazy) -> tensor``)."""

    read: Callable[[LazyTensor], torch.Tensor]


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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _FileRegion:
    """One tensor's bytes in a safetensors file, read on demand with plain reads (no memory map).

    A memory map keeps every page it touched resident and counted against the process until the file is
    closed, so loading a mapped checkpoint peaks at weights + checkpoint size; reading each tensor into
    its own buffer peaks at weights + the largest tensor.
    """

    def __init__(self, file: Path, name: str, dtype: torch.dtype, shape: list[int], offset: int) -> None:
        self.file, self.name, self.dtype, self.shape, self.offset = file, name, dtype, shape, offset

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (the whole tensor for a 0-d one)."""
        rows = self.shape[0] if self.shape else 1
        start, stop = max(0, min(start, rows)), max(0, min(stop, rows))
        stop = max(stop, start)
        row_bytes = torch.Size(self.shape[1:]).numel() * torch.empty((), dtype=self.dtype).element_size()
        nbytes = (stop - start) * row_bytes
        data = bytearray(nbytes)
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * row_bytes)
            if nbytes and f.readinto(data) != nbytes:
                raise CheckpointError(f"{self.file}: tensor {self.name!r} is truncated")
        shape = [stop - start, *self.shape[1:]] if self.shape else []
        # the tensor shares the bytearray's memory (no copy); frombuffer refuses an empty buffer
        buffer = torch.frombuffer(data, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        return buffer.view(self.dtype).reshape(shape)

    def read_into(self, out: torch.Tensor) -> None:
        """The whole tensor straight into ``out`` (contiguous, on the CPU, this dtype and shape): no buffer
        of its own, so a load into place or into a staging buffer holds the tensor once."""
        flat = out.reshape(-1).view(torch.uint8)   # a view: ``out`` is contiguous
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            if flat.numel() and f.readinto(flat.numpy().data) != flat.numel():
                raise CheckpointError(f"{self.file}: tensor {self.name!r} is truncated")

    def __getitem__(self, index: object) -> torch.Tensor:
        if isinstance(index, slice) and index.step in (None, 1) and self.shape:
            start, stop, _ = index.indices(self.shape[0])
            return self.read_rows(start, stop)
        whole = self.read_rows(0, self.shape[0] if self.shape else 1)
        return whole if index is Ellipsis or index == slice(None) else whole[index].clone()  # type: ignore[index]


def _safetensors_regions(file: Path) -> list[_FileRegion]:
    """The tensors of a safetensors file in file order, header validated before any data is read."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
        header_len = int.from_bytes(head, "little")
        if header_len <= 0 or 8 + header_len > size:
            raise CheckpointError(f"{file}: not a safetensors file (header length {header_len} for {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{file}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: unreadable safetensors header (not a JSON object)")
    base = 8 + header_len
    regions = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry ({exc})") from exc
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or start < 0 or base + end > size:
            raise CheckpointError(f"{file}: tensor {name!r} spans bytes {start}..{end}, which does not fit "
                                  f"its shape {shape} {info['dtype']} or the file ({size} bytes)")
        regions.append((start, _FileRegion(file, name, dtype, shape, base + start)))
    return [region for _, region in sorted(regions, key=lambda item: item[0])]


def checkpoint_nbytes(files: list[Path]) -> int:
    """Bytes of every tensor in ``files`` as stored (safetensors: from the headers, no data read; a
    pickle: its file size, since its tensors are known only once loaded). The total for ``progress``."""
    total = 0
    for file in files:
        if file.suffix == ".bin":
            total += file.stat().st_size
            continue
        try:
            total += sum(region.nbytes for region in _safetensors_regions(file))
        except OSError as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc
    return total


def _read_safetensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for region in _safetensors_regions(file):
        yield region.name, region[...]


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, each read into its own buffer (see ``_read_safetensors``)."""
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
            yield from _read_safetensors(file)
        except OSError as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc


class LazyTensor:
    """One checkpoint tensor, not yet read: ``shape``, ``[index]`` (reads only that part) and ``load()``."""

    def __init__(self, file: Path, name: str, source: object) -> None:
        self.file, self.name, self._source = file, name, source   # a safetensors slice or a tensor

    @property
    def shape(self) -> tuple[int, ...]:
        src = self._source
        if isinstance(src, (torch.Tensor, _FileRegion)):
            return tuple(src.shape)
        return tuple(src.get_shape())  # type: ignore[attr-defined]

    def __getitem__(self, index: object) -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return self._source[index]  # type: ignore[index]
        except CheckpointError:
            raise
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"{self.file}: cannot read {self.name} ({exc})") from exc

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in the checkpoint (whatever part of it is read)."""
        src = self._source
        return src.nbytes if isinstance(src, (torch.Tensor, _FileRegion)) else 0

    def load(self) -> torch.Tensor:
        return self[...] if isinstance(self._source, (torch.Tensor, _FileRegion)) else self[:]

    def mapped(self, mappings: FileMappings) -> torch.Tensor | None:
        """The whole tensor as a read-only view of its file's mapping (``weights.mapping``), not a copy; None
        when it cannot be one (a pickled tensor, or bytes not viewable in place)."""
        src = self._source
        if not isinstance(src, _FileRegion):
            return None
        try:
            return mappings.view(src.file, src.offset, src.dtype, src.shape)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.file}: cannot map {self.name} ({exc})") from exc

    @property
    def dtype(self) -> torch.dtype | None:
        """The stored dtype of a safetensors tensor or a loaded one (None for a slice not read yet)."""
        src = self._source
        return src.dtype if isinstance(src, (torch.Tensor, _FileRegion)) else None

    def read_into(self, out: torch.Tensor) -> bool:
        """Read the whole tensor straight into ``out`` when it can be (a safetensors tensor; ``out`` a
        contiguous CPU tensor of the same dtype and shape); False, with nothing read, otherwise."""
        src = self._source
        if not (isinstance(src, _FileRegion) and out.device.type == "cpu" and out.dtype == src.dtype
                and tuple(out.shape) == tuple(src.shape) and out.is_contiguous()):
            return False
        try:
            src.read_into(out)
        except OSError as exc:
            raise CheckpointError(f"{self.file}: cannot read {self.name} ({exc})") from exc
        return True


def iter_checkpoint_lazy(files: list[Path]) -> Iterator[tuple[str, LazyTensor]]:
    """Like :func:`iter_checkpoint`, but yields unread :class:`LazyTensor` s that read only what is asked
    (a tensor-parallel rank reads its rows, or the tensor it slices columns from)."""
    for file in files:
        if file.suffix == ".bin":
            for name, tensor in iter_checkpoint([file]):
                yield name, LazyTensor(file, name, tensor)
            continue
        try:
            regions = _safetensors_regions(file)
        except OSError as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from exc
        for region in regions:
            yield region.name, LazyTensor(file, region.name, region)


def _reported(items: Iterator[tuple[str, LazyTensor]], progress: Progress | None
              ) -> Iterator[tuple[str, LazyTensor]]:
    """``items``, calling ``progress(nbytes)`` once the caller has handled each one."""
    for name, lazy in items:
        yield name, lazy
        if progress is not None:
            progress(lazy.nbytes)


class WeightSink:
    """Where :func:`load_weights` puts each checkpoint tensor. This one: straight into the model's parameters,
    already allocated where they are (a plain copy, cast to the parameter's dtype).

    ``loading``'s default builder passes a :class:`~internvl_runtime.weights.direct.DirectSink` instead, which
    allocates each module on its own device when its first tensor arrives and swaps a module once it is
    complete (quantization); tensor-parallel ranks use this one."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def destination(self, param_name: str) -> torch.Tensor:
        """The tensor to fill for ``param_name`` (the whole parameter; the loader narrows it to a shard)."""
        return self.model.get_parameter(param_name).data

    def adopt(self, param_name: str, source: LazyTensor) -> bool:
        """Make the checkpoint tensor ``source`` (whole, unsliced, untransformed, of the parameter's shape) the
        parameter itself, a view of the file, instead of copying it; True if done. This sink never does (the
        parameters are allocated already); ``DirectSink`` does where mapping applies (``weights.mapping``)."""
        return False

    def write(self, dest: torch.Tensor, source: torch.Tensor | LazyTensor) -> None:
        """Copy ``source`` (a tensor on the CPU in the checkpoint's dtype, or a checkpoint tensor not read
        yet) into ``dest``, cast to ``dest``'s dtype; an unread one of ``dest``'s dtype is read in place."""
        if isinstance(source, LazyTensor):
            if source.read_into(dest):
                return
            source = source.load()
        dest.copy_(source.to(dtype=dest.dtype))

    def completed(self, param_name: str) -> None:
        """Every shard of ``param_name`` is in (called once per parameter, as soon as it is)."""


@dataclass(frozen=True)
class _ParamSpec:
    shape: tuple[int, ...]
    offsets: dict[object, tuple[int, int]] | None     # shard id -> (start row, rows) of a fused parameter

    def complete(self, got: set[object]) -> bool:
        return None in got or (self.offsets is not None and bool(got) and set(self.offsets) <= got)


def _param_specs(model: nn.Module) -> dict[str, _ParamSpec]:
    """Every parameter's shape and shard offsets, read once before loading (the meta model's suffice: the
    loader never looks at a parameter's tensor again except through the sink)."""
    specs = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        offsets = getattr(model.get_submodule(owner), "shard_offsets", None) if owner else None
        specs[name] = _ParamSpec(tuple(param.shape), offsets)
    return specs


def load_weights(model: nn.Module, files: list[Path], resolve: Resolver,
                 optional: Callable[[str], bool] = lambda name: False,
                 skip: Callable[[str], bool] = lambda name: False, progress: Progress | None = None,
                 sink: WeightSink | None = None) -> set[str]:
    """Copy every checkpoint tensor into ``model``; raise WeightMismatchError naming all problems.

    ``optional(param_name)`` marks parameters that may be absent from the checkpoint (tied heads).
    ``progress(nbytes)`` is called after each checkpoint tensor (see the module docstring).
    ``sink``: where the tensors go (default :class:`WeightSink`: the parameters as allocated); shapes are
    checked against the model before the sink is asked for a destination, so a misshaped tensor allocates
    nothing. Returns the set of checkpoint names consumed.
    """
    sink = sink or WeightSink(model)
    specs = _param_specs(model)
    filled: dict[str, set[object]] = {}
    unexpected, misshaped, consumed = [], [], set()
    with torch.no_grad():
        for name, lazy in _reported(iter_checkpoint_lazy(files), progress):
            target = resolve(name)
            if target == ELSEWHERE:
                consumed.add(name)
                continue
            if target is None or target[0] not in specs:
                unexpected.append(name)
                continue
            param_name, shard_id, transform = target
            if skip(param_name):
                consumed.add(name)
                continue
            spec = specs[param_name]
            shape = spec.shape
            if shard_id is not None:
                if spec.offsets is None or shard_id not in spec.offsets:
                    unexpected.append(name)
                    continue
                start, size = spec.offsets[shard_id]
                shape = (size, *shape[1:])
            source: torch.Tensor | LazyTensor
            if transform is None:
                source = lazy                  # read by the sink, into place where it can be
            elif isinstance(transform, LazyTransform):
                source = transform.read(lazy)
            else:
                source = transform(lazy.load())
            if tuple(source.shape) != shape:
                misshaped.append(f"{name}: checkpoint {tuple(source.shape)} vs model {shape}")
                continue
            if not (shard_id is None and source is lazy and sink.adopt(param_name, lazy)):
                dest = sink.destination(param_name)
                if shard_id is not None:
                    dest = dest.narrow(0, start, size)
                sink.write(dest, source)
                del dest
            del source                         # nothing of the tensor or the parameter stays referenced here
            got = filled.setdefault(param_name, set())
            was_complete = spec.complete(got)
            got.add(shard_id)
            consumed.add(name)
            if not was_complete and spec.complete(got):
                sink.completed(param_name)

    missing = []
    for param_name, spec in specs.items():
        got = filled.get(param_name, set())
        if spec.complete(got) or skip(param_name) or optional(param_name):
            continue
        if spec.offsets is not None and got:
            missing.append(f"{param_name} (shards {sorted(map(str, set(spec.offsets) - got))})")
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
