"""Helpers shared by the layers above (file I/O, key formats, enums, constants)."""
