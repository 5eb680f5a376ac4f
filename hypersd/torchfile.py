"""Read the tensors of a ``torch.save`` file without running an unpickler.

A torch.save file is a pickle that describes the saved object plus the raw bytes of each
tensor storage. torch.save's zip serialisation (torch 1.6 on) is a zip holding
``<archive>/data.pkl``, one record ``<archive>/data/<key>`` per storage and ``<archive>/byteorder``;
the legacy serialisation before it is one stream: a magic number, a protocol version and a
system-info pickle, the object's pickle, a pickle listing the storage keys, then each
storage as an int64 element count followed by its bytes. Unpickling either may call any
function the file names, so a published weights file could run code when it is loaded.

Here the pickle is only disassembled (``pickletools.genops`` decodes opcodes and executes
nothing) and a small stack machine of our own carries out the opcodes a state dict needs:
containers, numbers, strings, the memo, storage references (``BINPERSID``), and calls of
these names alone, each implemented below rather than looked up:

- ``collections.OrderedDict``: an empty dict the pickle fills (a module's ``_metadata`` kept);
- ``torch._utils._rebuild_tensor_v2`` / ``_v3``: a tensor viewing its storage's bytes with the
  recorded dtype, offset, size and stride (``torch.frombuffer`` then ``torch.as_strided``);
- ``torch._utils._rebuild_parameter``: an ``nn.Parameter`` of such a tensor;
- torch's storage types and dtypes, which only name an element type.

What is trusted, then, is the layout above and nothing else: any other opcode or name (a
class instance, ``builtins.open``, a numpy array) is refused with a :class:`UserError` when
the disassembler reaches it; no name in the file is ever imported or called. Both
serialisations are read because published weights from before torch 1.6 use the legacy one.
Storages are read once each, as a tensor names them; only little-endian files are read.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from hypersd.errors import UserError

_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128,
    torch.complex64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)}
_STORAGES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32,
             "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
             "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
             "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
             "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


def load_state_dict(path: str | Path) -> dict:
    """The dict a torch.save file holds (zip or legacy serialisation), tensors on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if head.startswith(b"PK"):
            state = _read_zip(path)
        elif head[:1] == b"\x80":
            with open(path, "rb") as f:
                state = _read_legacy(path, f)
        else:
            raise UserError(f"{path} is not a torch.save file: pass a .pth/.pt state dict "
                            "or a .safetensors file")
    except (zipfile.BadZipFile, ValueError, EOFError, IndexError, KeyError, TypeError,
            AttributeError, RuntimeError, struct.error, MemoryError, OverflowError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is damaged or not a torch.save file ({reason}): "
                        "download it again or convert it to .safetensors") from e
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch.save file, tensors on the CPU."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_state_dict(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from e


def _refuse(path: Path, what: str) -> UserError:
    what = "".join(c if c.isprintable() else "?" for c in what)
    return UserError(f"{path} contains {what}, which hypersd does not read: "
                     "convert it to .safetensors (tensors only) and pass that")


def _read_zip(path: Path) -> object:
    """torch.save's zip serialisation: the object's pickle, one record per storage."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UserError(f"{path} is a zip but not a torch.save file (no <archive>/data.pkl)")
        prefix = pickles[0].removesuffix("data.pkl")
        if f"{prefix}byteorder" in archive.namelist():
            order = _record(path, archive, f"{prefix}byteorder").decode()
            if order != "little":
                raise UserError(f"{path} was saved big-endian: hypersd reads little-endian files")
        storages: dict[str, _Storage] = {}

        def storage(pid) -> _Storage:
            dtype, key, numel = _storage_reference(path, pid)
            if key not in storages:
                buffer = _record(path, archive, f"{prefix}data/{key}")
                if len(buffer) != numel * dtype.itemsize:
                    raise UserError(f"{path}: storage {key!r} holds {len(buffer)} bytes, "
                                    f"not {numel} x {dtype.itemsize}: the file is damaged")
                storages[key] = _Storage(dtype, buffer)
            return storages[key]

        return _Machine(path, storage).run(io.BytesIO(_record(path, archive, pickles[0])))


def _record(path: Path, archive: zipfile.ZipFile, name: str) -> bytearray:
    """A record's bytes; torch.save stores records uncompressed, so none outgrows the file."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.file_size > path.stat().st_size:
        raise UserError(f"{path}: record {name!r} is compressed or larger than the file: "
                        "torch.save writes neither, so the file is damaged or not torch's")
    buffer = bytearray(info.file_size)
    with archive.open(info) as record:
        if record.readinto(buffer) != len(buffer):
            raise UserError(f"{path}: record {name!r} is shorter than its header says: it is damaged")
    return buffer


def _read_legacy(path: Path, f) -> object:
    """The serialisation before torch 1.6: header pickles, the object, then the storages."""
    magic, protocol, info = (_Machine(path).run(f) for _ in range(3))
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
        raise UserError(f"{path} is not a torch.save file (a pickle without torch's header)")
    if info["little_endian"] is not True:
        raise UserError(f"{path} was saved big-endian: hypersd reads little-endian files")
    size, storages = path.stat().st_size, {}

    def storage(pid) -> _Storage:
        dtype, key, numel = _storage_reference(path, pid)
        if key not in storages:
            if numel * dtype.itemsize > size:
                raise UserError(f"{path}: storage {key!r} is larger than the file: it is damaged")
            storages[key] = _Storage(dtype, bytearray(numel * dtype.itemsize))
        return storages[key]

    state = _Machine(path, storage).run(f)
    keys = [str(key) for key in _Machine(path).run(f)]  # the storages' bytes follow in this order
    if sorted(keys) != sorted(storages):
        raise UserError(f"{path}: its storage list does not match its tensors: the file is damaged")
    for key in keys:
        buffer = storages[key].buffer
        (numel,) = struct.unpack("<q", f.read(8))
        if numel * storages[key].dtype.itemsize != len(buffer) or f.readinto(buffer) != len(buffer):
            raise UserError(f"{path}: storage {key!r} is shorter than its tensors: the file is damaged")
    return state


def _storage_reference(path: Path, pid) -> tuple[torch.dtype, str, int]:
    """(dtype, key, element count) of a persistent id ('storage', type, key, location, numel)."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[4], int) and pid[4] >= 0):
        raise _refuse(path, f"the persistent reference {pid!r:.80}")
    if len(pid) == 6 and pid[5] is not None:
        raise _refuse(path, "a storage view (an early torch layout)")
    return pid[1].dtype, str(pid[2]), pid[4]


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


class _Storage:
    """One storage's bytes, shared by every tensor that views it."""

    def __init__(self, dtype: torch.dtype, buffer: bytearray):
        self.dtype, self.buffer = dtype, buffer
        self.bytes = (torch.frombuffer(buffer, dtype=torch.uint8) if buffer
                      else torch.empty(0, dtype=torch.uint8))


def _is_shape(xs) -> bool:
    return isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)


def _tensor(storage, offset, size, stride, requires_grad, hooks, dtype=None, metadata=None):
    """[torch._utils._rebuild_tensor_v2/_v3] a strided view of a storage."""
    if not (isinstance(storage, _Storage) and type(offset) is int and offset >= 0
            and _is_shape(size) and _is_shape(stride) and len(size) == len(stride)
            and not hooks and not metadata):
        raise TypeError("a tensor record that is not a plain strided tensor")
    flat = storage.bytes.view(storage.dtype if dtype is None else dtype)
    tensor = torch.as_strided(flat, size, stride, offset)
    return tensor.requires_grad_() if requires_grad else tensor


def _tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise TypeError("a tensor record without a dtype")
    return _tensor(storage, offset, size, stride, requires_grad, hooks, dtype, metadata)


def _parameter(data, requires_grad, hooks):
    """[torch._utils._rebuild_parameter] an nn.Parameter holding ``data``."""
    if not isinstance(data, torch.Tensor) or hooks:
        raise TypeError("a parameter record that is not a plain tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def _ordered_dict(*args):
    if args:
        raise TypeError("an OrderedDict built from arguments")
    return OrderedDict()


_CALLS = {("collections", "OrderedDict"): _ordered_dict,
          ("torch._utils", "_rebuild_tensor_v2"): _tensor,
          ("torch._utils", "_rebuild_tensor_v3"): _tensor_v3,
          ("torch._utils", "_rebuild_parameter"): _parameter}


def _resolve(path: Path, module, name):
    """What an allowlisted global stands for; any other global is refused."""
    if (module, name) in _CALLS:
        return _CALLS[module, name]
    if module == "torch" and name in _STORAGES:
        return _StorageType(_STORAGES[name])
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return _StorageType(torch.uint8)
    if module == "torch" and name in _DTYPES:
        return _DTYPES[name]
    raise _refuse(path, f"{module}.{name}"[:120])


class _Machine:
    """A stack machine for one pickle that carries out the allowlisted opcodes only.

    Each ``op_*`` method is one opcode of the pickle protocol (see ``pickletools``' table);
    ``_OPCODES`` maps the opcodes allowed to them.
    """

    def __init__(self, path: Path, storage=None):
        self.path, self.storage = path, storage
        self.stack, self.marks, self.memo = [], [], {}

    def run(self, stream) -> object:
        """The object the pickle at ``stream``'s position builds; ``stream`` ends after it."""
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name == "STOP":
                return self.stack.pop()
            if opcode.name not in _OPCODES:
                raise _refuse(self.path, f"the pickle opcode {opcode.name}")
            _OPCODES[opcode.name](self, arg)
        raise ValueError("the pickle ends without STOP")

    def pop_mark(self) -> list:
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def op_proto(self, protocol):
        if protocol > 5:
            raise ValueError(f"pickle protocol {protocol}")

    def op_frame(self, size):
        pass  # framing only groups opcodes for reading

    def op_value(self, value):  # ints, floats, strings: genops has decoded them
        self.stack.append(value)

    def op_none(self, _):
        self.stack.append(None)

    def op_true(self, _):
        self.stack.append(True)

    def op_false(self, _):
        self.stack.append(False)

    def op_empty_dict(self, _):
        self.stack.append({})

    def op_empty_list(self, _):
        self.stack.append([])

    def op_empty_tuple(self, _):
        self.stack.append(())

    def op_mark(self, _):
        self.marks.append(len(self.stack))

    def op_tuple(self, _):
        self.stack.append(tuple(self.pop_mark()))

    def op_tuple_n(self, n):
        if len(self.stack) < n:
            raise IndexError("TUPLE%d on a shorter stack" % n)
        items = tuple(self.stack[-n:])
        del self.stack[-n:]
        self.stack.append(items)

    def op_put(self, index):
        self.memo[index] = self.stack[-1]

    def op_memoize(self, _):
        self.memo[len(self.memo)] = self.stack[-1]

    def op_get(self, index):
        self.stack.append(self.memo[index])

    def op_setitem(self, _):
        value, key = self.stack.pop(), self.stack.pop()
        self.set_items([key, value])

    def op_setitems(self, _):
        self.set_items(self.pop_mark())

    def set_items(self, items: list):
        if not isinstance(self.stack[-1], dict):
            raise TypeError("SETITEMS on something that is not a dict")
        self.stack[-1].update(zip(items[::2], items[1::2]))

    def op_append(self, _):
        self.extend([self.stack.pop()])

    def op_appends(self, _):
        self.extend(self.pop_mark())

    def extend(self, items: list):
        if not isinstance(self.stack[-1], list):
            raise TypeError("APPENDS on something that is not a list")
        self.stack[-1].extend(items)

    def op_global(self, name: str):  # genops gives "module name"
        self.stack.append(_resolve(self.path, *name.split(" ", 1)))

    def op_stack_global(self, _):
        name, module = self.stack.pop(), self.stack.pop()
        self.stack.append(_resolve(self.path, module, name))

    def op_reduce(self, _):
        args, call = self.stack.pop(), self.stack.pop()
        if not any(call is c for c in _CALLS.values()) or not isinstance(args, tuple):
            raise _refuse(self.path, f"a call of {call!r}"[:120])
        self.stack.append(call(*args))

    def op_build(self, _):
        state, target = self.stack.pop(), self.stack[-1]
        if not (isinstance(target, OrderedDict) and isinstance(state, dict)
                and set(state) <= {"_metadata"}):
            raise _refuse(self.path, "an object with state other than a module's _metadata")
        if "_metadata" in state:
            target._metadata = state["_metadata"]

    def op_persistent_id(self, _):
        if self.storage is None:
            raise _refuse(self.path, "a storage reference outside the object's pickle")
        self.stack.append(self.storage(self.stack.pop()))


_OPCODES = {
    "PROTO": _Machine.op_proto, "FRAME": _Machine.op_frame,
    **dict.fromkeys(("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT",
                     "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"), _Machine.op_value),
    "NONE": _Machine.op_none, "NEWTRUE": _Machine.op_true, "NEWFALSE": _Machine.op_false,
    "EMPTY_DICT": _Machine.op_empty_dict, "EMPTY_LIST": _Machine.op_empty_list,
    "EMPTY_TUPLE": _Machine.op_empty_tuple, "MARK": _Machine.op_mark,
    "TUPLE": _Machine.op_tuple,
    "TUPLE1": lambda m, _: m.op_tuple_n(1), "TUPLE2": lambda m, _: m.op_tuple_n(2),
    "TUPLE3": lambda m, _: m.op_tuple_n(3),
    "BINPUT": _Machine.op_put, "LONG_BINPUT": _Machine.op_put, "MEMOIZE": _Machine.op_memoize,
    "BINGET": _Machine.op_get, "LONG_BINGET": _Machine.op_get,
    "SETITEM": _Machine.op_setitem, "SETITEMS": _Machine.op_setitems,
    "APPEND": _Machine.op_append, "APPENDS": _Machine.op_appends,
    "GLOBAL": _Machine.op_global, "STACK_GLOBAL": _Machine.op_stack_global,
    "REDUCE": _Machine.op_reduce, "BUILD": _Machine.op_build,
    "BINPERSID": _Machine.op_persistent_id,
}
