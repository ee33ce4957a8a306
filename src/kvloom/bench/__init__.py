"""Benchmarks run as ``python -m kvloom bench <name>`` (registered in ``kvloom.cli.BENCHES``).

Each prints its command, the machine with ceilings measured in the same run, and the peers
measured alongside kvloom, and can write its results as JSON (``--json``) for diffing.

The benchmarks (``throughput``, ``decode``, ``serve`` with ``sweep``, ``prefix``, ``lora``,
``structured``, ``tools``; ``throughput_report`` and ``decode_report`` print two of them) keep
only their own measurement; the skeleton they share is ``runner`` (command and machine header,
turns between systems, results). Shared pieces below them: ``settings`` (kvloom's
``--kvloom-config``), ``workload`` (the standard prompts), ``machine`` (facts and ceilings),
``peers`` (transformers, driven as fast as it goes), ``extra`` (what the ``bench`` extra adds);
below those, ``analysis``: floors, rooflines, latency, goodput, plots, computed from results
without running anything (import-linter holds the layers). The checkpoints the benchmarks run
on are specified and cached in ``kvloom.models.checkpoints``, outside this package.
"""
