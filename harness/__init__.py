"""Tooling for tests and benchmarks: prefixroute processes on 127.0.0.1 (procs), and a whole fleet simulated in
one process for routing studies (fleet_sim), Prometheus and the dashboards' queries (prom), and how a benchmark
writes its results (results)."""
