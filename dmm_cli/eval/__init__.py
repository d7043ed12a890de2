"""Evaluation (paper §4.1): FID_t matrices, feature spaces, extra measures and the report."""
