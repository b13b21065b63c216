"""The kvstore service: KV chunks by key, with a TTL and a byte budget, in memory, in shared memory
(same-host readers read /dev/shm directly) or in Redis."""
