"""The kvstore service: KV chunks by key, with a TTL and a byte budget, over memory or Redis."""
