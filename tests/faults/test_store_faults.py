"""Redis goes away and comes back while the stack serves: where the kvstore is optional (the
--checkpoint-kv copy) serving goes on; where it is required (--kv-transfer kvstore) requests get
UNAVAILABLE while it is down and succeed again once it is back, with no service restarted."""

from __future__ import annotations

import grpc
import pytest

from services.client import GatewayClient, GatewayError
from tests.faults.conftest import assert_nothing_held

PROMPT = "The three primary colors are"


def _pids(faults) -> dict[str, int]:
    return {name: process.pid for name, process in faults.stack.processes.items()}


async def test_redis_restart_does_not_stop_serving_with_checkpoints(faults, fault_redis, runtime, encoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(PROMPT), 8)
    pids = _pids(faults)
    async with GatewayClient(faults["gateway"]) as client:
        fault_redis.stop()
        try:
            down = await client.complete(PROMPT, max_tokens=8, temperature=0, timeout=120)
        finally:
            fault_redis.start()
        up = await client.complete(PROMPT, max_tokens=8, temperature=0, timeout=120)
    assert down.token_ids == up.token_ids == expected
    assert _pids(faults) == pids
    await assert_nothing_held(faults)


async def test_redis_restart_with_kvstore_transfer_is_unavailable_then_recovers(faults, fault_redis, runtime,
                                                                                 encoder) -> None:
    expected = runtime.reference_generate(encoder.encode_text(PROMPT), 8)
    pids = _pids(faults)
    async with GatewayClient(faults["gateway_kvstore"]) as client:
        fault_redis.stop()
        try:
            with pytest.raises(GatewayError) as caught:
                await client.complete(PROMPT, max_tokens=8, temperature=0, timeout=120)
        finally:
            fault_redis.start()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redis" in caught.value.details().lower() or "kvstore" in caught.value.details().lower()
        await assert_nothing_held(faults)
        result = await client.complete(PROMPT, max_tokens=8, temperature=0, timeout=120)
    assert result.token_ids == expected
    assert _pids(faults) == pids
    await assert_nothing_held(faults)
