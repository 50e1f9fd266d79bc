"""Ray Data wiring and I/O around the operators (inputs, sink, reader)."""
