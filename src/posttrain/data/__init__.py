"""Prompt data: the `Sample` type and the sources that produce samples.

Sources: generated arithmetic (`posttrain.data.arithmetic`), local JSONL/Parquet files and
reasoning-gym tasks (`posttrain.data.sources`), public math datasets in their published formats
(`posttrain.data.datasets`), chat conversations for supervised fine-tuning and their
assistant-only token masks (`posttrain.data.chat`). Prompt templates: `posttrain.data.templates`; tokenization and the
resumable prompt iterator: `posttrain.data.prompts`. docs/data.md describes them all.
"""
