"""Engines: where the work of ``predict`` and ``fit`` runs when it is not this one process.

``ray_engine``: a Ray cluster, or Ray local on this machine (``--engine ray``). Ray is the optional extra
``patchcore[ray]`` and is imported only when an engine runs, never by ``import patchcore``.
"""
