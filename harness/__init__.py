"""What the tests and the benchmarks share to start and drive real processes: ports, HTTP, Prometheus reads,
servicer and server subprocesses, the SMG gateway, and generated images. Repo-local, like tests/ and bench/."""
