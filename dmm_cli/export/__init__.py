"""`dmm export`: a student's style baked into a plain checkpoint, the released DMM layout, single files."""
