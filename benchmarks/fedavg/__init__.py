"""The parts of the two fedavg benchmarks, one job per module.

``fedavg_vs_flower.py`` (the fold vs Flower's ``aggregate()``) and ``fedavg_round_vs_flower.py``
(whole rounds vs Flower's deployment engine) are thin drivers over these; what both need (sizes,
``/proc`` readings) exists once, in :mod:`fedavg.sizes` and :mod:`fedavg.procfs`.
"""
