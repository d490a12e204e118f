"""`kdgen export`: a job's chunk objects -> trainer-ready shards (shards.py), with MaxText's
tf.train.Example records built through protobuf (tfexample.py). See docs/outputs.md.
"""
