"""Shipped device profiles (YAML): datasheet figures, each file citing its source."""
