"""The store and daemon commands: pull, list, show, rm, ps, stop, version."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from erllama.cli.client import Daemon
from erllama.cli.output import Output, human_bytes
from erllama.errors import UnknownModelError
from erllama.store.info import describe
from erllama.store.store import ModelStore

__all__ = ["cmd_list", "cmd_ps", "cmd_pull", "cmd_rm", "cmd_show", "cmd_stop", "cmd_version"]


def cmd_pull(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    store = ModelStore(env=env)
    with out.pull_progress() as progress:
        entry = store.pull(args.source, name=args.name, sha256=args.sha256, progress=progress)
    out.result(entry.to_json(), f"{entry.name}  {entry.digest}  {human_bytes(entry.size)}")
    return 0


def cmd_list(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    entries = ModelStore(env=env).entries()
    rows = [[str(e.name), e.digest.removeprefix("sha256:")[:12], human_bytes(e.size), e.created[:10], e.source]
            for e in entries]  # fmt: skip
    out.result([e.to_json() for e in entries], out.table(["NAME", "ID", "SIZE", "PULLED", "SOURCE"], rows))
    return 0


def cmd_show(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    entry = ModelStore(env=env).get(args.model)
    info = describe(entry.path)
    data: dict[str, Any] = {**entry.to_json(), **info, "license": info["license"] or entry.license}
    if args.template:
        out.result(data, info["chat_template"] or "(no chat template)")
        return 0
    params = f"{info['parameters'] / 1e6:.1f}M" if info["parameters"] < 1e9 else f"{info['parameters'] / 1e9:.2f}B"
    lines = [
        f"  {'model':<16}{entry.name}",
        f"  {'architecture':<16}{info['architecture']}",
        f"  {'parameters':<16}{params}",
        f"  {'quantization':<16}{info['quantization']}",
        f"  {'context length':<16}{info['context_length']}",
        f"  {'embedding':<16}{info['embedding_length']}",
        f"  {'layers':<16}{info['layers']}",
        f"  {'vocabulary':<16}{info['vocab_size']}",
        f"  {'license':<16}{data['license'] or 'unknown'}",
        f"  {'template':<16}{'yes (--template prints it)' if info['chat_template'] else 'none'}",
        f"  {'digest':<16}{entry.digest}{'' if entry.verified else ' (recorded, not promised by the source)'}",
        f"  {'size':<16}{human_bytes(entry.size)}",
        f"  {'source':<16}{entry.source}",
    ]
    out.result(data, "\n".join(lines))
    return 0


def cmd_rm(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    store = ModelStore(env=env)
    removed = []
    for model in args.models:
        entry = store.get(model)  # unknown names fail before anything is removed
        if daemon.up():
            daemon.stop(str(entry.name))  # a live daemon lets go of it first
        store.remove(str(entry.name))
        removed.append(str(entry.name))
    out.result({"removed": removed}, "\n".join(f"deleted '{n}'" for n in removed))
    return 0


def _tier_metrics(text: str) -> dict[str, dict[str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    tiers: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("erllama_cache_tier_bytes", "erllama_cache_tier_rows", "erllama_cache_tier_budget_bytes"):
            key = family.name.removeprefix("erllama_cache_tier_")
            for sample in family.samples:
                tiers.setdefault(sample.labels.get("tier", "?"), {})[key] = sample.value
    return tiers


def _build_metrics(text: str) -> dict[str, str]:
    """The labels of ``erllama_build_info`` (the loaded libllama: backend, CPU variant, ...); empty before a load."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == "erllama_build_info":
            for sample in family.samples:
                return dict(sample.labels)
    return {}


def _until(expires_at: str) -> str:
    """An /api/ps expiry as a person reads it: "never" for the far-future time Ollama's API uses for that."""
    return "never" if expires_at[:4].isdigit() and int(expires_at[:4]) >= 2200 else expires_at


def cmd_ps(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    models = daemon.ps()
    metrics = daemon.metrics()
    tiers = _tier_metrics(metrics)
    build = _build_metrics(metrics)
    rows = [[m["name"], human_bytes(int(m.get("size", 0))), str(m.get("context_length", "")),
             _until(str(m.get("expires_at", "")))] for m in models]  # fmt: skip
    text = out.table(["NAME", "SIZE", "CONTEXT", "UNTIL"], rows)
    if tiers:
        tier_rows = [[t, str(int(v.get("rows", 0))), human_bytes(int(v.get("bytes", 0))),
                      human_bytes(int(v.get("budget_bytes", 0)))] for t, v in sorted(tiers.items())]  # fmt: skip
        text += "\n\n" + out.table(["CACHE TIER", "ROWS", "BYTES", "BUDGET"], tier_rows)
    if build:
        text += f"\n\nlibllama: {build.get('backend', '?')}, CPU kernels {build.get('cpu_variant', '?')}"
        text += f" (self-check {build.get('selfcheck', '?')})"
    out.result({"models": models, "cache_tiers": tiers, "build": build}, text)
    return 0


def cmd_stop(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    stopped = daemon.stop(args.model)
    if not stopped and not daemon.knows(args.model):
        raise UnknownModelError(f"the daemon at {daemon.host} has no model '{args.model}'")
    out.result({"model": args.model, "stopped": stopped}, None if stopped else f"{args.model} was not loaded")
    return 0


def cmd_version(args: argparse.Namespace, env: Mapping[str, str], out: Output, daemon: Daemon) -> int:
    import erllama

    data: dict[str, Any] = {"erllama": erllama.__version__}
    try:
        from erllama._native import library

        lib = library()
        data["llama.cpp"] = str(lib.manifest.get("source_id", "")).removeprefix("git-")[:12]
        data["origin"] = str(lib.manifest.get("origin", ""))
        data["backend"] = lib.backend
        build = lib.build
        data |= {k: build[k] for k in ("flavor", "cpu_variant", "selfcheck", "deterministic", "patches")}
    except ImportError as exc:  # LibraryError derives from ImportError
        data["llama.cpp"] = f"not built ({exc})"
    text = f"erllama {data['erllama']}\nllama.cpp {data['llama.cpp']}" + (
        f" ({data['backend']})" if "backend" in data else ""
    )
    if "cpu_variant" in data:
        text += f"\nbuild {data['flavor']}, CPU kernels {data['cpu_variant']} (self-check {data['selfcheck']})"
        text += "\npatches " + (", ".join(data["patches"]) or "none")
        text += "\nbatch-invariant kernels" if data["deterministic"] else ""
    out.result(data, text)
    return 0
