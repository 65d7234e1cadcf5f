"""Tools around training: the memory and FLOPs plan, AVQA preparation, benchmark scoring, measurements."""
