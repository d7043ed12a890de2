"""Generation: sampling with a style vector, cached sample sets, and `dmm generate`."""
