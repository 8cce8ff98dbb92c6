"""The offline mini-benchmark: a real, CPU-sized miniature of the eight-task setup."""
