"""prefixroute loadgen: trace replay and synthetic workloads against any OpenAI URL (built in the measurement issue)."""
