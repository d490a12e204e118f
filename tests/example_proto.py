"""The tf.train.Example message classes, built with the protobuf runtime from the same definitions
as tensorflow/core/example/{feature,example}.proto (which MaxText copies as
maxtext/input_pipeline/protos/{feature,example}.proto and parses with example_pb2.Example), so
that tests parse records exactly as MaxText's reader does, without TensorFlow or MaxText."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
PACKAGE = "kdgen_test.example"


def _message(file, name, fields, options=None):
    m = file.message_type.add(name=name)
    for number, (fname, label, ftype, type_name, packed) in enumerate(fields, 1):
        f = m.field.add(name=fname, number=number, label=label, type=ftype)
        if type_name:
            f.type_name = f".{PACKAGE}.{type_name}"
        if packed:
            f.options.packed = True
    return m


def example_class():
    file = descriptor_pb2.FileDescriptorProto(name="kdgen_test_example.proto", package=PACKAGE, syntax="proto3")
    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    _message(file, "BytesList", [("value", rep, F.TYPE_BYTES, None, False)])
    _message(file, "FloatList", [("value", rep, F.TYPE_FLOAT, None, True)])
    _message(file, "Int64List", [("value", rep, F.TYPE_INT64, None, True)])
    feature = _message(file, "Feature", [("bytes_list", opt, F.TYPE_MESSAGE, "BytesList", False),
                                         ("float_list", opt, F.TYPE_MESSAGE, "FloatList", False),
                                         ("int64_list", opt, F.TYPE_MESSAGE, "Int64List", False)])
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    features = _message(file, "Features", [("feature", rep, F.TYPE_MESSAGE, "Features.FeatureEntry", False)])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, label=opt, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=opt, type=F.TYPE_MESSAGE, type_name=f".{PACKAGE}.Feature")
    entry.options.map_entry = True
    _message(file, "Example", [("features", opt, F.TYPE_MESSAGE, "Features", False)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Example"))


Example = example_class()
