"""Recipes: YAML with `defaults:` inheritance and dotted overrides, validated by pydantic models.

Importing this package does not import torch.
"""

from posttrain.config.loader import ConfigError, dump_config, load_config, load_recipe
from posttrain.config.schema import RecipeConfig

__all__ = ["ConfigError", "RecipeConfig", "dump_config", "load_config", "load_recipe"]
