"""Evaluation: the metrics (``metrics``: numpy and scipy only, importing no torch) and the evaluation of a
detector on a data set's test split (``evaluate``)."""
