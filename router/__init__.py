"""prefixroute router: the cache-aware OpenAI-compatible front door in front of the workers."""
