"""``--explain``: per fusion rule, how often it fired and why it did not."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from graphopt.infra.instruments import PassRecord


def render_explain(records: Sequence[PassRecord], console: Console) -> None:
    """Prints one table per pass that reported rule counts (``stats["rules"]``)."""
    for record in records:
        rules = record.stats.get("rules")
        if not isinstance(rules, dict):
            continue
        misses = record.stats.get("explain", {})
        table = Table(title=f"{record.text}: rules")
        table.add_column("rule")
        table.add_column("fired", justify="right")
        table.add_column("closest miss (rules that never fired)")
        for name, count in rules.items():
            why = "" if count else str(misses.get(name, "not traced"))
            table.add_row(Text(name), str(count), Text(why))
        console.print(table)
