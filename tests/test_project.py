"""Project-level checks: generated protobuf code is fresh, settings come from flags and
environment variables and are validated, every service lists its flags."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.config import parse_settings
from services.decode.settings import DecodeSettings
from services.gateway.settings import GatewaySettings
from services.kvstore.settings import KvStoreSettings
from services.prefill.settings import PrefillSettings

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protobuf_code_is_fresh() -> None:
    result = subprocess.run([sys.executable, "tools/gen_proto.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_proto_element_is_documented() -> None:
    """Clients in other languages are generated from the .proto files: every service, rpc,
    message, enum and field carries a comment."""
    field = re.compile(r"^\s*(optional |repeated )?[\w.]+ \w+ = \d+;")
    undocumented = []
    for proto in (ROOT / "protos").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for index, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith(("message ", "service ", "enum ", "rpc ")) and \
                    not lines[index - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}: {stripped}")
            elif field.match(line) and "//" not in line and not lines[index - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}: {stripped}")
    assert not undocumented, undocumented


@pytest.mark.parametrize("module", ["gateway", "prefill", "decode", "kvstore"])
def test_help_lists_every_flag_with_its_variable(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", f"services.{module}", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "--port" in result.stdout and "[env" in result.stdout and "--log-level" in result.stdout


def test_flag_beats_environment_beats_default() -> None:
    env = {"PREFILL_PORT": "6000", "KV_CHUNK_TOKENS": "64"}
    settings = parse_settings(PrefillSettings, "prefill", "", ["--port", "7000"], env)
    assert (settings.port, settings.kv_chunk_tokens, settings.kv_chunk_layers) == (7000, 64, 4)


def test_boolean_environment_variable() -> None:
    settings = parse_settings(PrefillSettings, "prefill", "", [], {"CHECKPOINT_KV": "true",
                                                                  "KVSTORE_ADDRESS": "127.0.0.1:1"})
    assert settings.checkpoint_kv is True


@pytest.mark.parametrize(("cls", "env", "phrase"), [
    (GatewaySettings, {"KV_TRANSFER": "carrier-pigeon"}, "kv_transfer"),
    (GatewaySettings, {"GATEWAY_PORT": "70000"}, "port"),
    (GatewaySettings, {"DECODE_ADDRESSES": " , "}, "decode_addresses"),
    (DecodeSettings, {"MODEL_DTYPE": "int3"}, "dtype"),
    (DecodeSettings, {"MAX_CHUNK_MB": "0"}, "max_chunk_mb"),
    (PrefillSettings, {"CHECKPOINT_KV": "yes"}, "kvstore_address"),
    (PrefillSettings, {"KV_CHUNK_TOKENS": "many"}, "KV_CHUNK_TOKENS"),
    (PrefillSettings, {"KV_TRANSPORT": "pigeon"}, "kv_transport"),
    (PrefillSettings, {"KV_SHM_CHUNK_TOKENS": "0"}, "kv_shm_chunk_tokens"),
    (PrefillSettings, {"SHM_PREFIX": "../etc"}, "prefix"),
    (KvStoreSettings, {"KVSTORE_BACKEND": "floppy"}, "backend"),
    (KvStoreSettings, {"LOG_LEVEL": "LOUD"}, "log_level"),
])
def test_bad_settings_raise_value_error(cls: type, env: dict[str, str], phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        parse_settings(cls, "x", "", [], env)


def test_bad_setting_stops_the_service_with_a_message() -> None:
    result = subprocess.run([sys.executable, "-m", "services.kvstore", "--backend", "floppy"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "backend" in result.stderr


def test_readme_configuration_tables_list_every_setting() -> None:
    """The README's tables are what tools/settings_table.py makes of the settings classes."""
    from tools.settings_table import rewrite

    readme = (ROOT / "README.md").read_text()
    assert rewrite(readme) == readme, "README tables are stale: python tools/settings_table.py --write README.md"
