"""prefixroute router: the cache-aware OpenAI-compatible front door (built in the router issue)."""
