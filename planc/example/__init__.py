"""Small, real example checkpoints written by planc itself (no downloads)."""
from planc.example.tiny import TinyExample, write_tiny_example

__all__ = ["TinyExample", "write_tiny_example"]
