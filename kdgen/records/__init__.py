"""Records: what a finished row becomes, and the chunk objects that carry them (JSONL in
writer.py, typed parquet columns in parquet_codec.py). See docs/outputs.md.
"""
