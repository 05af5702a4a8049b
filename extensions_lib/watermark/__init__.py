"""Watermark scores with LAION's classifier (LAION-5B "pwatermark"): load, score, flag / move aside."""
