"""Running a network's forward (or another method) with less Python in the way.

On a small network on the CPU, the Python between the ops costs nearly as much as the ops: at
batch 1 on one thread of the 2-core CPU the mini UNet takes 14 ms eagerly and 10 ms as a traced
graph, the VAE decoder 6.4 and 5.7 ms. Two ways to get there, each returning a *twin* of the module (a shallow
copy: the same parameters and buffers, so nothing is copied and weight changes reach both)
whose method runs the faster form, the original left as it was:

  trace    a TorchScript graph traced on the first call of each signature (the shapes and
           dtypes of the tensor arguments, the values of the others, baked in as constants);
           about a second per signature, and the same kernels as eager mode, so the outputs
           are bitwise equal. TorchScript is deprecated in recent torch, but still the only
           form that pays on this CPU: the same gain as torch.compile at a hundredth of the cost.
  compile  ``torch.compile`` (inductor, one compilation per shape): the same gain on the mini
           UNet after about 100 s of compiling per shape on the 2-core CPU (while busy).

Calls a graph cannot take (``return_dict`` not False, arguments that are not tensors or plain
values, gradients on) run eagerly.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree

MAX_GRAPHS = 32           # traced signatures kept per module, least recently used dropped first
PLAIN = (bool, int, float, str, type(None))  # argument values a graph bakes in


class _Call(torch.nn.Module):
    """``method(module, *args, **kwargs)`` with the tensors as the only inputs, for tracing."""

    def __init__(self, module: torch.nn.Module, method: Callable, spec, leaves: list, slots: list[int]):
        super().__init__()
        self.module = module                 # a submodule: the graph reads its parameters
        self.method, self.spec, self.leaves, self.slots = method, spec, leaves, slots

    def forward(self, *tensors):
        leaves = list(self.leaves)
        for slot, tensor in zip(self.slots, tensors):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.method(self.module, *args, **kwargs)


def _signature(leaves: list, spec) -> tuple | None:
    """What a traced graph depends on, or None when it cannot take these arguments."""
    key = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        elif isinstance(leaf, PLAIN):
            key.append((type(leaf), leaf))
        else:
            return None
    return tuple(key)


def traced(module: torch.nn.Module, name: str = "forward", ignore: tuple[str, ...] = ()) -> torch.nn.Module:
    """A twin of ``module`` whose ``name`` method runs a graph traced per call signature.
    Keyword arguments in ``ignore`` are dropped first (ones the method does not read, such as
    the generator ``AutoencoderKL.decode`` takes and ignores)."""
    method = getattr(type(module), name)
    graphs: OrderedDict = OrderedDict()

    def call(*args, **kwargs):
        for key in ignore:
            kwargs.pop(key, None)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        if key is None or kwargs.get("return_dict", True) or torch.is_grad_enabled():
            return method(module, *args, **kwargs)
        if key not in graphs:
            graphs[key] = _trace(module, method, spec, leaves)
            if len(graphs) > MAX_GRAPHS:
                graphs.popitem(last=False)
        graphs.move_to_end(key)
        return graphs[key](*[leaf for leaf in leaves if isinstance(leaf, torch.Tensor)])

    return _twin(module, name, call)


def _trace(module, method, spec, leaves):
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    static = [None if i in slots else leaf for i, leaf in enumerate(leaves)]
    with warnings.catch_warnings():  # the deprecation notice and the tracer's advice on Python values
        warnings.simplefilter("ignore")
        return torch.jit.trace(_Call(module, method, spec, static, slots), tuple(leaves[i] for i in slots),
                               check_trace=False, strict=False)


def compiled(module: torch.nn.Module, name: str = "forward", ignore: tuple[str, ...] = ()) -> torch.nn.Module:
    """A twin of ``module`` whose ``name`` method is ``torch.compile``d (one compilation per shape)."""
    fast = torch.compile(getattr(type(module), name).__get__(module), dynamic=False)

    def call(*args, **kwargs):
        for key in ignore:
            kwargs.pop(key, None)
        return fast(*args, **kwargs)

    return _twin(module, name, call)


def eager(module: torch.nn.Module, name: str = "forward", ignore: tuple[str, ...] = ()) -> torch.nn.Module:
    """``module`` itself."""
    return module


def _twin(module: torch.nn.Module, name: str, call: Callable) -> torch.nn.Module:
    twin = copy.copy(module)  # shares the parameter, buffer and submodule dicts
    object.__setattr__(twin, name, call)
    return twin


SPEEDUPS = {"trace": traced, "compile": compiled, "none": eager}
