"""What the benchmarks compute from their measurements, apart from measuring them.

Pure functions over numbers, configs, traces and result dicts: the GEMM floor of a workload
(``floor``), the memory-bandwidth roofline of decoding (``roofline``), where two greedy token lists
part (``divergence``), served requests' latency distributions (``latency``), SLO attainment and
goodput (``goodput``), and the sweep's plots (``plots``).
Nothing here runs an engine or a peer, and nothing here imports the rest of ``kvloom.bench``
(an import-linter contract holds it). Importing any of it is cheap: torch (``divergence``) and
matplotlib (``plots``, from the ``bench`` extra: ``pip install 'kvloom[bench]'``; without it the
plots are skipped and the reason says so) load only inside the functions that use them.
"""
