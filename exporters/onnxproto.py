"""ONNX files read without the ``onnx`` package: the messages of ``onnx.proto`` that the kit reads, parsed by protobuf.

Importing ``onnx`` costs about 0.7 s of CPU (most of it in the ``ml_dtypes`` extension that ``onnx.helper`` loads),
more than ONNX Runtime itself. Running an ONNX file needs none of it: :func:`exporters.graph.read_graph` parses the file
with :func:`parse_model` into messages of the same names, field numbers and types as ONNX's own (``ModelProto``,
``GraphProto``, ``NodeProto``, ``AttributeProto``, ``TensorProto``, ``ValueInfoProto``, ...), defined here in a
private descriptor pool (package ``otkit_onnx``, so nothing clashes with ``onnx``'s). They are a subset: the fields
left out (documentation strings, training information, the tensors' data, ...) are kept as unknown fields, unread.
Every function of :mod:`exporters.graph` takes either kind of message. tests/test_startup.py checks every field here
against the installed ``onnx``'s descriptors.

Only protobuf's runtime is imported (a dependency of ``onnx``), about 25 ms.
"""

from __future__ import annotations

import enum
import functools
from typing import Any

__all__ = ["PACKAGE", "AttributeType", "DataLocation", "TensorType", "decode_error", "message_class", "parse_model"]

#: protobuf package of the messages (ONNX's is ``onnx``)
PACKAGE = "otkit_onnx"


class TensorType(enum.IntEnum):
    """ONNX ``TensorProto.DataType``: element types."""

    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26
    FLOAT6E2M3 = 27
    FLOAT6E3M2 = 28


class DataLocation(enum.IntEnum):
    """ONNX ``TensorProto.DataLocation``: where a tensor's data is."""

    DEFAULT = 0
    EXTERNAL = 1


class AttributeType(enum.IntEnum):
    """ONNX ``AttributeProto.AttributeType``."""

    UNDEFINED = 0
    FLOAT = 1
    INT = 2
    STRING = 3
    TENSOR = 4
    GRAPH = 5
    FLOATS = 6
    INTS = 7
    STRINGS = 8
    TENSORS = 9
    GRAPHS = 10
    SPARSE_TENSOR = 11
    SPARSE_TENSORS = 12
    TYPE_PROTO = 13
    TYPE_PROTOS = 14


# (name, number, type, repeated, message or enum type (relative to the package), oneof) per field, as in onnx.proto
_INT32, _INT64, _FLOAT, _STRING, _BYTES, _MESSAGE, _ENUM = "int32", "int64", "float", "string", "bytes", "message", "enum"
_MESSAGES: dict[str, list[tuple[str, int, str, bool, str | None, str | None]]] = {
    "StringStringEntryProto": [("key", 1, _STRING, False, None, None), ("value", 2, _STRING, False, None, None)],
    "OperatorSetIdProto": [("domain", 1, _STRING, False, None, None), ("version", 2, _INT64, False, None, None)],
    "TensorShapeProto.Dimension": [
        ("dim_value", 1, _INT64, False, None, "value"), ("dim_param", 2, _STRING, False, None, "value"),
        ("denotation", 3, _STRING, False, None, None)],
    "TensorShapeProto": [("dim", 1, _MESSAGE, True, "TensorShapeProto.Dimension", None)],
    "TypeProto.Tensor": [("elem_type", 1, _INT32, False, None, None),
                         ("shape", 2, _MESSAGE, False, "TensorShapeProto", None)],
    "TypeProto": [("tensor_type", 1, _MESSAGE, False, "TypeProto.Tensor", "value"),
                  ("denotation", 6, _STRING, False, None, None)],
    "ValueInfoProto": [("name", 1, _STRING, False, None, None), ("type", 2, _MESSAGE, False, "TypeProto", None),
                       ("doc_string", 3, _STRING, False, None, None)],
    "TensorProto": [
        ("dims", 1, _INT64, True, None, None), ("data_type", 2, _INT32, False, None, None),
        ("name", 8, _STRING, False, None, None), ("doc_string", 12, _STRING, False, None, None),
        ("external_data", 13, _MESSAGE, True, "StringStringEntryProto", None),
        ("data_location", 14, _ENUM, False, "TensorProto.DataLocation", None)],
    "SparseTensorProto": [("values", 1, _MESSAGE, False, "TensorProto", None),
                          ("indices", 2, _MESSAGE, False, "TensorProto", None), ("dims", 3, _INT64, True, None, None)],
    "AttributeProto": [
        ("name", 1, _STRING, False, None, None), ("ref_attr_name", 21, _STRING, False, None, None),
        ("doc_string", 13, _STRING, False, None, None),
        ("type", 20, _ENUM, False, "AttributeProto.AttributeType", None),
        ("f", 2, _FLOAT, False, None, None), ("i", 3, _INT64, False, None, None), ("s", 4, _BYTES, False, None, None),
        ("t", 5, _MESSAGE, False, "TensorProto", None), ("g", 6, _MESSAGE, False, "GraphProto", None),
        ("sparse_tensor", 22, _MESSAGE, False, "SparseTensorProto", None),
        ("floats", 7, _FLOAT, True, None, None), ("ints", 8, _INT64, True, None, None),
        ("strings", 9, _BYTES, True, None, None), ("tensors", 10, _MESSAGE, True, "TensorProto", None),
        ("graphs", 11, _MESSAGE, True, "GraphProto", None),
        ("sparse_tensors", 23, _MESSAGE, True, "SparseTensorProto", None)],
    "NodeProto": [
        ("input", 1, _STRING, True, None, None), ("output", 2, _STRING, True, None, None),
        ("name", 3, _STRING, False, None, None), ("op_type", 4, _STRING, False, None, None),
        ("domain", 7, _STRING, False, None, None), ("overload", 8, _STRING, False, None, None),
        ("attribute", 5, _MESSAGE, True, "AttributeProto", None), ("doc_string", 6, _STRING, False, None, None)],
    "GraphProto": [
        ("node", 1, _MESSAGE, True, "NodeProto", None), ("name", 2, _STRING, False, None, None),
        ("initializer", 5, _MESSAGE, True, "TensorProto", None),
        ("sparse_initializer", 15, _MESSAGE, True, "SparseTensorProto", None),
        ("doc_string", 10, _STRING, False, None, None), ("input", 11, _MESSAGE, True, "ValueInfoProto", None),
        ("output", 12, _MESSAGE, True, "ValueInfoProto", None),
        ("value_info", 13, _MESSAGE, True, "ValueInfoProto", None)],
    "FunctionProto": [
        ("name", 1, _STRING, False, None, None), ("input", 4, _STRING, True, None, None),
        ("output", 5, _STRING, True, None, None), ("attribute", 6, _STRING, True, None, None),
        ("node", 7, _MESSAGE, True, "NodeProto", None), ("doc_string", 8, _STRING, False, None, None),
        ("opset_import", 9, _MESSAGE, True, "OperatorSetIdProto", None), ("domain", 10, _STRING, False, None, None),
        ("overload", 13, _STRING, False, None, None)],
    "ModelProto": [
        ("ir_version", 1, _INT64, False, None, None),
        ("opset_import", 8, _MESSAGE, True, "OperatorSetIdProto", None),
        ("producer_name", 2, _STRING, False, None, None), ("producer_version", 3, _STRING, False, None, None),
        ("domain", 4, _STRING, False, None, None), ("model_version", 5, _INT64, False, None, None),
        ("doc_string", 6, _STRING, False, None, None), ("graph", 7, _MESSAGE, False, "GraphProto", None),
        ("metadata_props", 14, _MESSAGE, True, "StringStringEntryProto", None),
        ("functions", 25, _MESSAGE, True, "FunctionProto", None)],
}
_ENUMS: dict[str, type[enum.IntEnum]] = {
    "TensorProto.DataType": TensorType,
    "TensorProto.DataLocation": DataLocation,
    "AttributeProto.AttributeType": AttributeType,
}


@functools.cache
def _pool() -> Any:
    """A private descriptor pool holding the messages above (built once per process)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    f = descriptor_pb2.FieldDescriptorProto
    types = {_INT32: f.TYPE_INT32, _INT64: f.TYPE_INT64, _FLOAT: f.TYPE_FLOAT, _STRING: f.TYPE_STRING,
             _BYTES: f.TYPE_BYTES, _MESSAGE: f.TYPE_MESSAGE, _ENUM: f.TYPE_ENUM}
    file = descriptor_pb2.FileDescriptorProto(name="otkit/onnx_subset.proto", package=PACKAGE, syntax="proto2")
    made: dict[str, Any] = {}

    def message(path: str) -> Any:
        if path not in made:
            outer, _, inner = path.rpartition(".")
            made[path] = (message(outer).nested_type if outer else file.message_type).add(name=inner)
        return made[path]

    for path, fields in _MESSAGES.items():
        msg = message(path)
        oneofs: list[str] = []
        for name, number, kind, repeated, type_name, oneof in fields:
            field = msg.field.add(name=name, number=number, type=types[kind],
                                  label=f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL)
            if type_name is not None:
                field.type_name = f".{PACKAGE}.{type_name}"
            if oneof is not None:
                if oneof not in oneofs:
                    oneofs.append(oneof)
                    msg.oneof_decl.add(name=oneof)
                field.oneof_index = oneofs.index(oneof)
    for path, values in _ENUMS.items():
        outer, _, inner = path.rpartition(".")
        spec = message(outer).enum_type.add(name=inner)
        for v in values:
            spec.value.add(name=v.name, number=int(v))
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file.SerializeToString())
    return pool


@functools.cache
def message_class(name: str) -> type:
    """The message class ``name`` (``"ModelProto"``, ``"TensorShapeProto.Dimension"``, ...) of :data:`PACKAGE`."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"{PACKAGE}.{name}"))


def parse_model(data: bytes) -> Any:
    """``data`` parsed as an ONNX ``ModelProto`` (of this module's subset).

    Raises
    ------
    google.protobuf.message.DecodeError
        Bytes that are not a protobuf message of this shape (corrupt or truncated).
    """
    return message_class("ModelProto").FromString(data)


def decode_error() -> type[Exception]:
    """What :func:`parse_model` raises on bytes that do not parse."""
    from google.protobuf.message import DecodeError

    return DecodeError
