"""The pure core: typed functions on tensors and arrays, no I/O.

``features`` (locally aware patch features), ``coreset`` (greedy k-center), ``knn`` (exact blocked
nearest neighbours), ``scoring`` (patch and image scores, the named scoring modes), ``maps`` (anomaly
maps), ``thresholds`` (decision thresholds). Nothing here imports another layer of the package except
``patchcore.errors``.
"""
