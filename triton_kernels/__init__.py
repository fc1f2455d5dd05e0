"""Triton kernels (layer L0), installed as ``peft_fast.triton_kernels``.

One op per file, each with its pure-torch ``<op>_ref``; see shared/DESIGN.md. Nothing
above ``peft_fast/ops.py`` imports this package directly.
"""
