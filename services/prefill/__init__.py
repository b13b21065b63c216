"""The prefill service: prompt forward passes and the KV handoff to decode workers."""
