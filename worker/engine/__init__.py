"""The serving engine: block hash chain, block cache, sequences, scheduler, model runner and sampling."""
