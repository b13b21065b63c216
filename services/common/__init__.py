"""Code every service shares: config, errors, logging, gRPC bootstrap, model runtime, KV codec."""
