"""Print the settings of every service as Markdown tables, or (`--write README.md`) replace the
tables in the README with them. tests/test_project.py fails when the README's tables are stale."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from services.decode.settings import DecodeSettings
from services.gateway.settings import GatewaySettings
from services.kvstore.settings import KvStoreSettings
from services.prefill.settings import PrefillSettings

SERVICES = (("gateway", GatewaySettings), ("prefill", PrefillSettings), ("decode", DecodeSettings),
            ("kvstore", KvStoreSettings))


def table(cls: type) -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        default = str(field.default).replace(str(Path.home()), "~")
        rows.append(f"| `--{field.name.replace('_', '-')}` | `{field.metadata['env']}` | `{default}` | "
                    f"{field.metadata['help']} |")
    return "\n".join(rows)


def rewrite(text: str) -> str:
    """`text` with the table under each service's **name** heading replaced."""
    for name, cls in SERVICES:
        heading = f"**{name}**\n\n"
        start = text.index(heading + "| flag |") + len(heading)
        end = text.index("\n\n", start)
        text = text[:start] + table(cls) + text[end:]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="a Markdown file whose tables to replace")
    args = parser.parse_args()
    if args.write:
        args.write.write_text(rewrite(args.write.read_text()))
        return
    for name, cls in SERVICES:
        print(f"**{name}**\n\n{table(cls)}\n")


if __name__ == "__main__":
    main()
