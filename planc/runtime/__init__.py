"""The block-chain serving runtime: paged KV cache, per-block batching engine, HTTP server."""
