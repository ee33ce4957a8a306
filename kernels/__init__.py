"""Triton kernels for kvloom, installed as ``kvloom.kernels``.

One file per op: the ``@triton.jit`` kernel, its launcher and its pure-torch reference.
The references are what the CPU path runs and what the kernels are tested against.
Importing this package never imports triton; each op module imports it lazily.
"""
