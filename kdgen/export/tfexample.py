"""tf.train.Example records through protobuf (no TensorFlow).

The message classes are built at import with the protobuf runtime from the definitions of
TensorFlow's tensorflow/core/example/feature.proto and example.proto (proto3, package
`tensorflow`; MaxText parses them with its copy, example_pb2.Example), in a private descriptor
pool, so they never clash with a TensorFlow loaded in the same process. `_example_class` spells
out their messages (BytesList, FloatList, Int64List, Feature, Features, Example) field by field.
See docs/outputs.md (`--to maxtext-offline`).
"""

from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tensorflow"


def _example_class(map_entry: bool):
    fdp = descriptor_pb2.FieldDescriptorProto
    rep, opt = fdp.LABEL_REPEATED, fdp.LABEL_OPTIONAL
    feature_file = descriptor_pb2.FileDescriptorProto(
        name="tensorflow/core/example/feature.proto", package=PACKAGE, syntax="proto3")

    def message(file, name, fields):
        m = file.message_type.add(name=name)
        for number, (fname, label, ftype, type_name, packed) in enumerate(fields, 1):
            f = m.field.add(name=fname, number=number, label=label, type=ftype)
            if type_name:
                f.type_name = f".{PACKAGE}.{type_name}"
            if packed:
                f.options.packed = True
        return m

    message(feature_file, "BytesList", [("value", rep, fdp.TYPE_BYTES, None, False)])
    message(feature_file, "FloatList", [("value", rep, fdp.TYPE_FLOAT, None, True)])
    message(feature_file, "Int64List", [("value", rep, fdp.TYPE_INT64, None, True)])
    feature = message(feature_file, "Feature", [("bytes_list", opt, fdp.TYPE_MESSAGE, "BytesList", False),
                                                ("float_list", opt, fdp.TYPE_MESSAGE, "FloatList", False),
                                                ("int64_list", opt, fdp.TYPE_MESSAGE, "Int64List", False)])
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = message(feature_file, "Features", [("feature", rep, fdp.TYPE_MESSAGE, "Features.FeatureEntry", False)])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, label=opt, type=fdp.TYPE_STRING)
    entry.field.add(name="value", number=2, label=opt, type=fdp.TYPE_MESSAGE, type_name=f".{PACKAGE}.Feature")
    entry.options.map_entry = map_entry
    example_file = descriptor_pb2.FileDescriptorProto(
        name="tensorflow/core/example/example.proto", package=PACKAGE, syntax="proto3",
        dependency=["tensorflow/core/example/feature.proto"])
    message(example_file, "Example", [("features", opt, fdp.TYPE_MESSAGE, "Features", False)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(feature_file)
    pool.Add(example_file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Example"))


Example = _example_class(map_entry=True)  # the real message, for readers
# For writing: the same messages with Features.feature declared as what a map is on the wire, a
# repeated FeatureEntry {key = 1; value = 2} (protobuf's documented map equivalence). A map
# serializes in an order of the runtime's choosing; the repeated field keeps the order the
# features are given, so that a record's bytes do not depend on the protobuf version.
_OrderedExample = _example_class(map_entry=False)


def fill_feature(f, values) -> None:
    """Set a Feature: float_list for floating arrays, int64_list for integer arrays, bytes_list for bytes."""
    if isinstance(values, (bytes, str)):
        values = [values]
    if isinstance(values, list) and values and isinstance(values[0], (bytes, str)):
        f.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        return
    a = np.asarray(values)
    if np.issubdtype(a.dtype, np.floating):
        f.float_list.value.extend(a.ravel().astype(np.float32).tolist())
    elif np.issubdtype(a.dtype, np.integer) or a.dtype == bool or a.size == 0:
        f.int64_list.SetInParent()  # an empty list is still an int64_list (no value bytes)
        f.int64_list.value.extend(a.ravel().astype(np.int64).tolist())
    else:
        raise TypeError(f"unsupported feature dtype {a.dtype}")


def example(features: dict) -> bytes:
    """A serialized tf.train.Example of {name: values}, features in the order given."""
    ex = _OrderedExample()
    for name, values in features.items():
        entry = ex.features.feature.add(key=name)
        fill_feature(entry.value, values)
    return ex.SerializeToString()
