"""Tools around training: benchmarks, FLOP counts, the input-throughput
harness and the reference-checkpoint converter."""
