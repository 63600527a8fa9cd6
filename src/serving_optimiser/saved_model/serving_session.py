"""A SavedModel loaded the way TensorFlow Serving loads it: TensorFlow's C API
(``TF_LoadSessionFromSavedModel``, the C++ ``LoadSavedModel`` that ``tensorflow_model_server``
links), called through ctypes from the pip package's ``libtensorflow_cc.so.2``.

That loader restores the variables, then runs exactly one init op: the ``__saved_model_init_op``
signature, else the ``saved_model_main_op`` collection, else ``legacy_init_op``. Everything a
model needs at load (dequantize-once assignments, lookup tables, the int8 self-check) must be
reachable from that one op, and a signature is run as TF Serving runs it: ``Session::Run`` on the
signature's tensor names. :meth:`ServingSession.replay_warmup` replays
``assets.extra/tf_serving_warmup_requests`` as the model server does at load.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .errors import SavedModelError, tensorflow_detail
from .reader import as_tags

_TF_STRING = 7
_TSTRING_SIZE = 24  # sizeof(TF_TString)


class _Output(ctypes.Structure):
    _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


class _Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t), ("data_deallocator", ctypes.c_void_p)]


_SIGNATURES = {
    "TF_NewStatus": (ctypes.c_void_p, []),
    "TF_DeleteStatus": (None, [ctypes.c_void_p]),
    "TF_GetCode": (ctypes.c_int, [ctypes.c_void_p]),
    "TF_Message": (ctypes.c_char_p, [ctypes.c_void_p]),
    "TF_NewSessionOptions": (ctypes.c_void_p, []),
    "TF_DeleteSessionOptions": (None, [ctypes.c_void_p]),
    "TF_NewGraph": (ctypes.c_void_p, []),
    "TF_DeleteGraph": (None, [ctypes.c_void_p]),
    "TF_NewBuffer": (ctypes.POINTER(_Buffer), []),
    "TF_DeleteBuffer": (None, [ctypes.POINTER(_Buffer)]),
    "TF_LoadSessionFromSavedModel": (
        ctypes.c_void_p,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
         ctypes.c_void_p, ctypes.POINTER(_Buffer), ctypes.c_void_p],
    ),
    "TF_CloseSession": (None, [ctypes.c_void_p, ctypes.c_void_p]),
    "TF_DeleteSession": (None, [ctypes.c_void_p, ctypes.c_void_p]),
    "TF_GraphOperationByName": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "TF_SessionRun": (
        None,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(_Output), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
         ctypes.POINTER(_Output), ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
         ctypes.c_void_p, ctypes.c_void_p],
    ),
    "TF_AllocateTensor": (
        ctypes.c_void_p, [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_size_t]
    ),
    "TF_DeleteTensor": (None, [ctypes.c_void_p]),
    "TF_TensorData": (ctypes.c_void_p, [ctypes.c_void_p]),
    "TF_TensorByteSize": (ctypes.c_size_t, [ctypes.c_void_p]),
    "TF_TensorType": (ctypes.c_int, [ctypes.c_void_p]),
    "TF_NumDims": (ctypes.c_int, [ctypes.c_void_p]),
    "TF_Dim": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int]),
    "TF_StringInit": (None, [ctypes.c_void_p]),
    "TF_StringCopy": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
    "TF_StringGetDataPointer": (ctypes.c_void_p, [ctypes.c_void_p]),
    "TF_StringGetSize": (ctypes.c_size_t, [ctypes.c_void_p]),
    "TF_StringDealloc": (None, [ctypes.c_void_p]),
}


@functools.cache
def _library() -> ctypes.CDLL:
    """The C API of the TensorFlow this process imports (the same shared library, already loaded)."""
    import tensorflow as tf

    path = Path(tf.__file__).parent / "libtensorflow_cc.so.2"
    if not path.is_file():
        raise SavedModelError(f"{path}: this TensorFlow package has no C API library")
    library = ctypes.CDLL(str(path))
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments
    return library


class _Status:
    def __init__(self, library: ctypes.CDLL) -> None:
        self._library, self.handle = library, library.TF_NewStatus()

    def check(self, what: str) -> None:
        if self._library.TF_GetCode(self.handle) != 0:
            message = self._library.TF_Message(self.handle).decode(errors="replace")
            raise SavedModelError(f"{what}: {tensorflow_detail(message)}")

    def __del__(self) -> None:
        self._library.TF_DeleteStatus(self.handle)


class ServingSession:
    """One SavedModel loaded through TensorFlow's C++ loader; :meth:`run` calls a signature by its
    tensor names. Use as a context manager, or :meth:`close` it."""

    def __init__(self, directory: str | os.PathLike, tags: str | Iterable[str] = ("serve",)) -> None:
        from tensorflow.core.protobuf import meta_graph_pb2

        self.directory = str(directory)
        library = self._library = _library()
        tag_list = [tag.encode() for tag in as_tags(tags)]
        tag_array = (ctypes.c_char_p * len(tag_list))(*tag_list)
        status, options = _Status(library), library.TF_NewSessionOptions()
        self._graph = library.TF_NewGraph()
        meta_graph_buffer = library.TF_NewBuffer()
        try:
            self._session = library.TF_LoadSessionFromSavedModel(
                options, None, self.directory.encode(), tag_array, len(tag_list), self._graph, meta_graph_buffer,
                status.handle,
            )
            status.check(f"{self.directory}: TensorFlow's C++ loader")
            buffer = meta_graph_buffer.contents
            self.meta_graph = meta_graph_pb2.MetaGraphDef.FromString(ctypes.string_at(buffer.data, buffer.length))
        except SavedModelError:
            library.TF_DeleteGraph(self._graph)
            self._graph = self._session = None
            raise
        finally:
            library.TF_DeleteBuffer(meta_graph_buffer)
            library.TF_DeleteSessionOptions(options)

    @property
    def signature_keys(self) -> list[str]:
        return sorted(self.meta_graph.signature_def)

    def run(self, signature_key: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the signature for ``inputs`` (input key -> array), by output key."""
        if self._session is None:
            raise SavedModelError(f"{self.directory}: the session is closed")
        if signature_key not in self.meta_graph.signature_def:
            raise SavedModelError(f"{self.directory}: no signature '{signature_key}' (has {self.signature_keys})")
        signature = self.meta_graph.signature_def[signature_key]
        missing = sorted(set(signature.inputs) - set(inputs))
        unknown = sorted(set(inputs) - set(signature.inputs))
        if missing or unknown:
            problem = f"no input '{missing[0]}'" if missing else f"no such input '{unknown[0]}'"
            raise SavedModelError(f"signature '{signature_key}': {problem}")
        library = self._library
        input_keys, output_keys = sorted(signature.inputs), sorted(signature.outputs)
        feeds = (_Output * len(input_keys))(*(self._output(signature.inputs[k].name) for k in input_keys))
        fetches = (_Output * len(output_keys))(*(self._output(signature.outputs[k].name) for k in output_keys))
        input_tensors = [_to_tensor(library, inputs[k], signature.inputs[k].dtype) for k in input_keys]
        input_values = (ctypes.c_void_p * len(input_keys))(*input_tensors)
        output_values = (ctypes.c_void_p * len(output_keys))()
        status = _Status(library)
        try:
            library.TF_SessionRun(
                self._session, None, feeds, input_values, len(input_keys), fetches, output_values, len(output_keys),
                None, 0, None, status.handle,
            )
            status.check(f"{self.directory}: signature '{signature_key}'")
            return {key: _from_tensor(library, output_values[i]) for i, key in enumerate(output_keys)}
        finally:
            for tensor in input_tensors:
                _delete_tensor(library, tensor)
            for tensor in output_values:
                if tensor:
                    _delete_tensor(library, tensor)

    def replay_warmup(self) -> list[dict[str, np.ndarray]]:
        """Run every warm-up record in order, as TF Serving does at load; their outputs."""
        from .warmup import read_warmup_requests

        return [self.run(key, inputs) for key, inputs in read_warmup_requests(self.directory)]

    def _output(self, tensor_name: str) -> _Output:
        operation, _, index = tensor_name.partition(":")
        handle = self._library.TF_GraphOperationByName(self._graph, operation.encode())
        if not handle:
            raise SavedModelError(f"{self.directory}: the loaded graph has no operation '{operation}'")
        return _Output(handle, int(index or 0))

    def close(self) -> None:
        if self._session is not None:
            status = _Status(self._library)
            self._library.TF_CloseSession(self._session, status.handle)
            self._library.TF_DeleteSession(self._session, status.handle)
            self._library.TF_DeleteGraph(self._graph)
            self._session = self._graph = None

    def __enter__(self) -> ServingSession:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_session", None) is not None:
            self.close()


def _to_tensor(library: ctypes.CDLL, value, dtype_enum: int) -> int:
    from tensorflow.python.framework import dtypes

    dims = np.shape(value)
    dim_array = (ctypes.c_int64 * len(dims))(*dims)
    if dtype_enum == _TF_STRING:
        items = [item if isinstance(item, bytes) else str(item).encode() for item in np.asarray(value).reshape(-1)]
        tensor = library.TF_AllocateTensor(dtype_enum, dim_array, len(dims), len(items) * _TSTRING_SIZE)
        data = library.TF_TensorData(tensor)
        for index, item in enumerate(items):
            element = data + index * _TSTRING_SIZE
            library.TF_StringInit(element)
            library.TF_StringCopy(element, item, len(item))
        return tensor
    array = np.ascontiguousarray(value, dtype=dtypes.as_dtype(dtype_enum).as_numpy_dtype)
    tensor = library.TF_AllocateTensor(dtype_enum, dim_array, len(dims), array.nbytes)
    if array.nbytes:
        ctypes.memmove(library.TF_TensorData(tensor), array.ctypes.data, array.nbytes)
    return tensor


def _from_tensor(library: ctypes.CDLL, tensor: int) -> np.ndarray:
    from tensorflow.python.framework import dtypes

    dtype_enum = library.TF_TensorType(tensor)
    shape = tuple(library.TF_Dim(tensor, i) for i in range(library.TF_NumDims(tensor)))
    data = library.TF_TensorData(tensor)
    if dtype_enum == _TF_STRING:
        count = int(np.prod(shape, dtype=np.int64))
        items = []
        for index in range(count):
            element = data + index * _TSTRING_SIZE
            items.append(ctypes.string_at(library.TF_StringGetDataPointer(element), library.TF_StringGetSize(element)))
        return np.array(items, dtype=object).reshape(shape)
    numpy_dtype = np.dtype(dtypes.as_dtype(dtype_enum).as_numpy_dtype)
    size = library.TF_TensorByteSize(tensor)
    return np.frombuffer(ctypes.string_at(data, size), dtype=numpy_dtype).reshape(shape).copy()


def _delete_tensor(library: ctypes.CDLL, tensor: int) -> None:
    if library.TF_TensorType(tensor) == _TF_STRING:
        count = library.TF_TensorByteSize(tensor) // _TSTRING_SIZE
        data = library.TF_TensorData(tensor)
        for index in range(count):
            library.TF_StringDealloc(data + index * _TSTRING_SIZE)
    library.TF_DeleteTensor(tensor)
