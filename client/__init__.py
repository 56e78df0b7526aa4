"""What tests and benchmarks share to drive the services: the public API's client, process probes."""
