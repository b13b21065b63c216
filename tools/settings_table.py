"""Print the settings of every service as Markdown tables (pasted into the README)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.decode.settings import DecodeSettings
from services.gateway.settings import GatewaySettings
from services.kvstore.settings import KvStoreSettings
from services.prefill.settings import PrefillSettings


def table(name: str, cls: type) -> str:
    rows = [f"**{name}**\n", "| flag | environment | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        default = str(field.default).replace(str(Path.home()), "~")
        rows.append(f"| `--{field.name.replace('_', '-')}` | `{field.metadata['env']}` | `{default}` | "
                    f"{field.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    for name, cls in (("gateway", GatewaySettings), ("prefill", PrefillSettings), ("decode", DecodeSettings),
                      ("kvstore", KvStoreSettings)):
        print(table(name, cls) + "\n")
