"""Canonicalization patterns of ekko's dialects, one module per dialect (as xDSL
keeps them): the dialects' canonicalization traits load them on demand."""
