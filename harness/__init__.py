"""Running prefixroute processes on 127.0.0.1 for tests and benchmarks: free ports, start, wait, stop."""
