"""The gateway: the public gRPC front that routes requests to prefill and decode workers."""
