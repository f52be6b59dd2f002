"""Reporting: result files written atomically (``files``), heatmap overlays and masks (``overlays``), and the
self-contained HTML evaluation report (``html``)."""
