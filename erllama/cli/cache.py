"""``erllama cache ls | show | rm | stats``: what the KV-state cache holds, through the running daemon, or straight
from a kv directory (``--dir``, or the default one when no daemon runs; read from the rows' headers, nothing
changed but what ``rm`` removes)."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from erllama.cache.key import Namespace
from erllama.cache.listing import DirRow, find_key, read_dir, row_record
from erllama.cli.client import Daemon
from erllama.cli.local import default_kv_dir, model_file
from erllama.cli.output import Output, human_bytes
from erllama.errors import InvalidInputError
from erllama.store.store import ModelStore

__all__ = ["cmd_cache"]


def cmd_cache(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    offline = args.dir is not None or not daemon.up()
    if offline:
        return _offline(args, env, out)
    sub = args.cache_command
    if sub == "ls":
        listing = daemon.cache_rows(args.model, args.limit)
        out.result(listing, _table(out, listing["rows"], listing["count"]))
    elif sub == "show":
        row = daemon.cache_row(args.key)
        out.result(row, _detail(row))
    elif sub == "rm":
        removed = _remove_online(args, daemon)
        out.result({"deleted": removed}, f"deleted {removed} row{'s' if removed != 1 else ''}")
    else:
        stats = daemon.cache_stats()
        out.result(stats, _stats_text(stats))
    return 0


def _remove_online(args: argparse.Namespace, daemon: Daemon) -> int:
    if args.all:
        return daemon.cache_clear(args.model)
    if not args.keys:
        raise InvalidInputError("name the rows to remove (key prefixes), or --all")
    return sum(int(daemon.cache_remove(key)["deleted"]) for key in args.keys)


def _offline(args: argparse.Namespace, env: Mapping[str, str], out: Output) -> int:
    root = Path(args.dir) if args.dir else default_kv_dir(env)
    rows, bad = read_dir(root)
    for path in bad:
        out.note(f"not a readable row: {path}")
    detok = _vocab(args, env, out)
    sub = args.cache_command
    by_key = {r.info.meta.key: r for r in rows}
    if sub == "ls":
        records = [row_record(r.info, names={}, detokenize=detok) for r in rows[: args.limit]]
        listing = {
            "rows": records,
            "count": len(rows),
            "bytes": sum(r.info.tiers["disk"] for r in rows),
            "dir": str(root),
        }
        out.result(listing, _table(out, records, len(rows)))
    elif sub == "show":
        row = by_key[find_key(by_key, args.key)]
        record = row_record(row.info, names={}, detokenize=detok, preview=64, tokens=True) | {"path": str(row.path)}
        out.result(record, _detail(record))
    elif sub == "rm":
        chosen: Sequence[DirRow]
        if args.all:
            chosen = rows
        elif args.keys:
            chosen = [by_key[find_key(by_key, k)] for k in args.keys]
        else:
            raise InvalidInputError("name the rows to remove (key prefixes), or --all")
        removed = 0
        for row in chosen:
            try:
                row.path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        out.result({"deleted": removed}, f"deleted {removed} row{'s' if removed != 1 else ''} from {root}")
    else:
        stats = {
            "dir": str(root),
            "rows": len(rows),
            "bytes": sum(r.info.tiers["disk"] for r in rows),
            "tokens": sum(r.info.meta.n_tokens for r in rows),
            "unreadable": len(bad),
        }
        out.result(stats, "\n".join(f"{k}: {v}" for k, v in stats.items()))
    return 0


def _vocab(args: argparse.Namespace, env: Mapping[str, str], out: Output) -> Callable[[Namespace], Any]:
    """With ``--model``, the text of the rows (its vocabulary loaded without weights); else none."""
    if not getattr(args, "model", None):
        return lambda _ns: None
    from erllama.cluster.prompts import VocabModel

    _, path = model_file(args.model, ModelStore(env=env), out)
    vocab = VocabModel(path)
    return lambda _ns: vocab.detokenize


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= div:
            return f"{seconds / div:.0f}{unit}"
    return f"{seconds:.0f}s"


def _table(out: Output, records: list[dict[str, Any]], count: int) -> str:
    rows = [
        [
            r["key"][:12],
            str(r["model"]),
            str(r["tokens"]),
            human_bytes(int(r["bytes"])),
            ",".join(r["tiers"]),
            r["reason"],
            _age(r["age_s"]),
            str(r["hits"]),
            (r["text"] or "").replace("\n", "⏎")[:48],
        ]
        for r in records
    ]
    table = out.table(["KEY", "MODEL", "TOKENS", "SIZE", "TIERS", "SAVED", "AGE", "HITS", "TEXT"], rows)
    more = f"\n({count - len(records)} more; --limit)" if count > len(records) else ""
    return table + more


def _detail(r: dict[str, Any]) -> str:
    created = datetime.datetime.fromtimestamp(r["created"], tz=datetime.UTC).isoformat(timespec="seconds")
    lines = [
        f"key:      {r['key']}",
        f"model:    {r['model']}",
        f"tokens:   {r['tokens']}",
        "tiers:    " + ", ".join(f"{t} ({human_bytes(n)})" for t, n in r["tiers"].items()),
        f"saved:    {r['reason']} at {created} ({_age(r['age_s'])} ago)",
        f"hits:     {r['hits']}" + (f", last {_age(r['last_hit_s'])} ago" if r.get("last_hit_s") is not None else ""),
    ]
    if r.get("path"):
        lines.append(f"file:     {r['path']}")
    if r.get("text") is not None:
        lines.append(f"text:     {r['text']!r}")
    return "\n".join(lines)


def _stats_text(s: dict[str, Any]) -> str:
    lines = [f"rows: {s['rows']}"]
    for name, t in s["tiers"].items():
        size = f"{human_bytes(t['bytes'])} of {human_bytes(t['budget_bytes'])}"
        lines.append(f"{name}: {t['rows']} rows, {t['tokens']} tokens, {size}")
    share = f" ({100 * s['restored_share']:.1f}%)" if s.get("restored_share") is not None else ""
    lines.append(f"prompt tokens looked up: {int(s['query_tokens'])}, restored: {int(s['restored_tokens'])}{share}")
    by_tier = ", ".join(f"{k} {int(v)}" for k, v in s["restored_tokens_by_tier"].items())
    lines.append(f"restored by tier: {by_tier}")
    return "\n".join(lines)
