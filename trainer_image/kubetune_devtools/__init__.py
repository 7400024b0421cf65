"""Tools for working on the trainer, never shipped in its image: the tiny model the tests, the demo and the
CPU benchmark build on the fly (``tiny``), and the throughput benchmark behind ``make bench`` (``bench``)."""
