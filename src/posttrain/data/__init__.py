"""Prompt data: the `Sample` type and the sources that produce samples.

Sources: local JSONL/Parquet files and reasoning-gym tasks (`posttrain.data.sources`).
"""
