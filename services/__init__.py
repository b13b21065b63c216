"""Disaggregated prefill/decode LLM serving: gateway, prefill, decode and kvstore services."""
