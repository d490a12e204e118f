"""Records: what a finished row becomes and the chunk objects that carry them. schema.py
defines every field once; builders.py makes a row's records; chunk_object.py encodes, seals,
commits and reads a chunk's object (JSONL here, typed columns in parquet_codec.py); naming.py
says where objects live in OUT. Depends on the corpus (chunks) and storage, never on an engine.
See docs/outputs.md.
"""
