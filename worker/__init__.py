"""prefixroute worker: one process per GPU serving the OpenAI API with a block-level prefix KV cache."""
