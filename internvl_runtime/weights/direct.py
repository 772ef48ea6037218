"""Loading straight onto the devices: ``DirectSink``, the sink ``loading``'s default builder hands to
:func:`~internvl_runtime.weights.loader.load_weights`.

The model is built on the meta device (shapes, no memory). Nothing is allocated up front: when the first
checkpoint tensor of a module arrives, that module's own parameters are allocated on the module's device
(``device_for(module name)``: a placement unit's device); each tensor is copied there through a
``StagingBuffer`` (pinned on CUDA); and once every parameter of the module is complete (the fused
qkv / gate_up parameters: every shard in), ``finish(name, module)`` may return a module to put in its
place (a quantized layer, made on that device; the float weights are dropped with the old module).

So host memory holds about one checkpoint tensor at a time whatever the placement, and device memory the
placed model plus the module being filled; with quantization the float weights alive at once are those
of the modules being filled (one linear layer in checkpoint order), never the model's.

Mapping (``may_map``): a parameter the caller allows (``may_map(parameter name)``: the loader's rule, a CPU
target computing in the stored dtype, in a module it will not quantize) is not allocated at all when its
checkpoint tensor can be viewed as stored: it becomes a read-only view of the file (``weights.mapping``). The
module's other parameters are then allocated one by one as they arrive (without ``may_map``, a module's
parameters are allocated together when its first tensor arrives).

Reading to quantize (``may_view``): a parameter of a module that ``finish`` will replace (a linear layer
quantized, or bf16-packed, on the CPU) is, on the same conditions, a view of the file too, read by ``finish`` in
place of a 16-bit copy; once the module is replaced, the pages its parameters were read from are taken out of the
process (``FileMappings.drop_pages``; a tied LM head read from the mapped embeddings drops the embeddings' pages, which
the decode then touches one row per token). So quantizing at load costs the process neither a 16-bit copy of
the layer nor the file pages behind it: what stays resident is the quantized model. Such views are not counted
in ``mapped_bytes`` (none outlives its module). A fused parameter (several checkpoint tensors) is still copied.

``watch(name, tensor)``, if given, is told of every parameter allocated or mapped (a memory tracker for tests
and benchmarks: it may keep weak references, never strong ones).

``finished``: modules already complete (a second pass over part of a model, such as a vision encoder loaded
after the rest): ``close()`` leaves them alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .loader import LazyTensor, WeightSink
from .mapping import FileMappings, anonymous_empty, streamed_empty
from .staging import StagingBuffer

#: ``finish(module name, module) -> replacement or None``, called once a module's parameters are all in.
Finish = Callable[[str, nn.Module], "nn.Module | None"]
#: ``watch(parameter name, tensor)``: a parameter was just allocated.
Watch = Callable[[str, torch.Tensor], None]


def allocate(module: nn.Module, names: Iterable[str], device: torch.device, *, scratch: bool = False) -> None:
    """Replace the meta parameters ``names`` of ``module`` by uninitialised ones on ``device``.

    ``torch.empty`` from the meta tensor's shape and dtype, not ``torch.empty_like(meta, device=...)`` or
    ``nn.Module.to_empty``: those run through torch's Python references, whose first call imports sympy
    (~30 MB resident in every process that loads a model, for an allocation). On the CPU, a parameter of at
    least ``HUGE_PAGE_BYTES`` gets an anonymous mapping of its own advised for huge pages
    (``weights.mapping.streamed_empty``: a fused q/k/v or gate/up weight, or every weight with ``mmap=False``);
    ``scratch``: every one gets a mapping of its own, without the advice (``anonymous_empty``), for parameters
    that live only until their module is quantized."""
    for name in names:
        meta = getattr(module, name)
        if device.type == "cpu" and scratch:
            tensor = anonymous_empty(meta.shape, meta.dtype)
        else:
            tensor = streamed_empty(meta.shape, meta.dtype, device)
        setattr(module, name, nn.Parameter(tensor, requires_grad=meta.requires_grad))


class DirectSink(WeightSink):
    """Allocate each module on its device on first use, copy through staging, finish modules as they
    complete (see the module docstring). Call ``close()`` after the checkpoint (and after tying weights):
    it finishes what no checkpoint tensor completed (a tied LM head) and waits for the last copy."""

    def __init__(self, model: nn.Module, device_for: Callable[[str], torch.device], *,
                 finish: Finish | None = None, watch: Watch | None = None,
                 staging: StagingBuffer | None = None, may_map: Callable[[str], bool] | None = None,
                 may_view: Callable[[str], bool] | None = None, mappings: FileMappings | None = None,
                 finished: Iterable[str] = ()) -> None:
        super().__init__(model)
        self.device_for = device_for
        self.finish = finish
        self.watch = watch
        self.staging = staging or StagingBuffer()
        self.may_map = may_map
        self.may_view = may_view
        self.mappings = mappings or FileMappings()   # given: shared with the quantizer's ``release``
        self._mapped_bytes = 0                    # of the views that stay (``may_map``)
        self._complete: set[str] = set()          # parameter names
        self._finished: set[str] = set(finished)  # module names

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the parameters made views of the checkpoint file (not allocated) that stay in the model
        (not the views read to quantize: see the module docstring)."""
        return self._mapped_bytes

    def adopt(self, param_name: str, source: LazyTensor) -> bool:
        keep = self.may_map is not None and self.may_map(param_name)
        if not keep and (self.may_view is None or not self.may_view(param_name)):
            return False
        owner, _, leaf = param_name.rpartition(".")
        module = self._module(owner, param_name)
        param = getattr(module, leaf)
        if self.device_for(owner).type != "cpu" or source.dtype != param.dtype or not param.is_meta:
            return False
        view = source.mapped(self.mappings)
        if view is None:
            return False
        setattr(module, leaf, nn.Parameter(view, requires_grad=False))
        if keep:
            self._mapped_bytes += view.numel() * view.element_size()
        if self.watch is not None:
            self.watch(param_name, view)
        return True

    def destination(self, param_name: str) -> torch.Tensor:
        owner, _, leaf = param_name.rpartition(".")
        module = self._module(owner, param_name)
        params = dict(module.named_parameters(recurse=False))
        if self.may_map is None and self.may_view is None:
            allocated = [name for name, p in params.items() if p.is_meta]
        else:                # a sibling may be mapped when it arrives: allocate this parameter alone
            allocated = [leaf] if params[leaf].is_meta else []
        # a module to be quantized (``may_view``): its copied parameters (a fused one's shards) are scratch memory
        allocate(module, allocated, self.device_for(owner),
                 scratch=self.may_view is not None and self.may_view(param_name))
        if self.watch is not None:
            for name in allocated:
                self.watch(f"{owner}.{name}" if owner else name, getattr(module, name))
        return getattr(module, leaf).data

    def _module(self, owner: str, param_name: str) -> nn.Module:
        if owner in self._finished:
            raise AssertionError(f"{param_name}: a checkpoint tensor for a module already finished")
        return self.model.get_submodule(owner)

    def write(self, dest: torch.Tensor, source: torch.Tensor | LazyTensor) -> None:
        self.staging.copy(dest, source)

    def completed(self, param_name: str) -> None:
        self._complete.add(param_name)
        owner = param_name.rpartition(".")[0]
        module = self.model.get_submodule(owner)
        prefix = f"{owner}." if owner else ""
        if all(prefix + name in self._complete for name, _ in module.named_parameters(recurse=False)):
            self._finish(owner, module)

    def close(self) -> None:
        """Finish every module not finished yet whose parameters are all allocated (a head tied to the
        embeddings: no tensor of its own), wait for the last copy and drop the staging buffer."""
        self.staging.synchronize()
        for name, module in list(self.model.named_modules()):
            params = list(module.parameters(recurse=False))
            if name not in self._finished and params and not any(p.is_meta for p in params):
                self._finish(name, module)
        self.staging.release()
        self.mappings.release()

    def _finish(self, name: str, module: nn.Module) -> None:
        self._finished.add(name)
        if self.finish is None:
            return
        # no wait for the copy in flight: work on its device queues behind it on the same stream
        replacement = self.finish(name, module)
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, replacement)
            for param in module.parameters(recurse=False):    # read once to quantize: the pages can go
                self.mappings.drop_pages(param)
