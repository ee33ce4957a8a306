"""Benchmarks run as ``python -m kvloom bench <name>`` (registered in ``kvloom.cli.BENCHES``).

Each prints its command, the machine with ceilings measured in the same run, and the peers
measured alongside kvloom, and can write its results as JSON (``--json``) for diffing.
Shared pieces: ``workload`` (prompts and cached random checkpoints), ``machine``, ``peers``.
"""
