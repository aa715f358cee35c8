"""The command line: ``erllama`` / ``python -m erllama``.

Exit codes (also in docs/cli.md)::

    0  success
    1  failure (a download, the daemon or the runtime failed)
    2  usage error (unknown command or option)
    3  no such model (or cache row)
    4  no daemon at the address (ps, stop)
    5  invalid input: a bad name, a refused source
    6  verification failed: a checksum mismatch, not a GGUF file
    130 interrupted
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from erllama.cli.client import DEFAULT_HOST, Daemon
from erllama.cli.output import Output
from erllama.errors import (
    ChecksumError,
    DaemonUnavailableError,
    ErllamaError,
    InvalidInputError,
    UnknownCacheRowError,
    UnknownModelError,
)

__all__ = ["EXIT_CODES", "console", "main"]

EXIT_CODES = {"ok": 0, "error": 1, "usage": 2, "not_found": 3, "no_daemon": 4, "invalid": 5, "verify": 6}

Command = Callable[[argparse.Namespace, Mapping[str, str], Output, Daemon], int]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--host", help=f"the daemon's address (default: $ERLLAMA_HOST or {DEFAULT_HOST})")
    parser = argparse.ArgumentParser(prog="erllama", description="erllama: warm prompts for llama.cpp")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    srv = sub.add_parser("serve", help="serve models over HTTP (OpenAI, Anthropic, Ollama)")
    srv.add_argument("--model", help="a GGUF file or a store model to load at start and keep loaded")
    srv.add_argument("--models-dir", help="serve the GGUF files of this directory instead of the model store")
    srv.add_argument("--name", help="the --model's name in requests (default: its store name or file stem)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require this key (default: $ERLLAMA_API_KEY; none when unset)")
    srv.add_argument("--parallel", type=int, default=4, help="sequences decoded together")
    srv.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    srv.add_argument("--batch", type=int, default=512, help="tokens per decode call (n_batch)")
    srv.add_argument("--batch-wait-ms", type=float, default=5.0,
                     help="at most this long (and 1%% of its estimated time) a prefill waits for requests arriving "
                          "with it; 0: off")  # fmt: skip
    srv.add_argument("--flash-attn", choices=["auto", "on", "off"], help="default: off on CPU builds, auto on GPUs")
    srv.add_argument("--max-concurrency", type=int, default=None, help="requests run at once (default: --parallel)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests that may wait beyond those")
    srv.add_argument("--queue-timeout", type=float, default=60.0, help="seconds a request may wait for a slot")
    srv.add_argument("--keep-alive", type=float, default=300.0, help="idle seconds before an on-demand model unloads")
    srv.add_argument("--cors-origin", action="append", help="allow this origin (repeatable; default: CORS off)")
    srv.add_argument("--ctx", type=int, default=4096, help="context tokens per sequence")
    srv.add_argument("--ram-cache-mb", type=int, default=1024, help="RAM tier budget of the KV-state cache")
    srv.add_argument("--ram-file-cache-mb", type=int, default=0,
                     help="ram_file tier budget: rows as files on a tmpfs, kept across restarts of the daemon"
                          " (not of the machine) and shareable; 0 (default): none")  # fmt: skip
    srv.add_argument("--ram-file-dir", help="the ram_file tier's directory (default: /dev/shm/erllama-<uid>)")
    srv.add_argument("--disk-cache-mb", type=int, default=8192, help="disk tier budget; 0: no disk tier")
    srv.add_argument("--no-cache", action="store_true", help="serve without the KV-state cache (for comparisons)")
    srv.add_argument("--kv-dir", help="disk tier directory (default: $ERLLAMA_CACHE_DIR/kv)")
    srv.add_argument("--log-level", default="info")
    srv.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request headers are not complete within this time (default: 10)",
    )
    srv.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a host name the daemon answers to without an API key, besides IP addresses and localhost (repeatable)",
    )

    srv.add_argument(
        "--strict-max-tokens",
        action="store_true",
        help="refuse a max_tokens beyond what the context leaves after the prompt (default: lower it to that)",
    )
    srv.add_argument(
        "--model-fallback",
        choices=["missing", "any", "none"],
        default="missing",
        help="which requests the default model (--model, else the only one) answers: those naming no model"
        " (default), also those naming an unknown one (llama-server's clients), or none",
    )
    srv.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampler seed of requests that give none, so a prompt samples the same reply each time"
        " (default: a fresh seed per request)",
    )
    srv.add_argument("--owned-by", default="erllama", help="owned_by of the models /v1/models lists (default: erllama)")
    srv.add_argument(
        "--prompts-as-sent",
        action="append",
        default=[],
        choices=["billing-header", "tool-results", "tools"],
        help="turn off one of the rewrites that keep agent clients' prompt prefixes stable (repeatable; docs/cache.md)",
    )

    cluster = sub.add_parser("cluster", help="serve a model as replicas on a Ray Serve cluster (erllama[cluster])")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="SUBCOMMAND")
    csrv = csub.add_parser("serve", help="deploy the model's replicas and serve them over HTTP until stopped")
    csrv.add_argument("--model", required=True, help="a GGUF path present on every node, or a store model")
    csrv.add_argument("--name", help="the model's name in requests (default: --model)")
    csrv.add_argument("--replicas", type=int, default=2, help="model replicas (default: 2)")
    csrv.add_argument("--autoscale", nargs=2, type=int, metavar=("MIN", "MAX"), help="let Ray scale the replicas")
    csrv.add_argument("--address", help="a running Ray cluster (ray://host:10001, or auto); default: start one here")
    csrv.add_argument("--host", default="127.0.0.1", help="address of Ray's HTTP proxy")
    csrv.add_argument("--port", type=int, default=8000)
    csrv.add_argument("--router", choices=["prefix", "default"], default="prefix",
                      help="erllama's token-exact prefix router (default) or Ray's power of two choices")  # fmt: skip
    csrv.add_argument("--threads", type=int, default=1, help="CPU threads per replica")
    csrv.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    csrv.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded per replica (-1: all)")
    csrv.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica")
    csrv.add_argument("--ctx", type=int, default=4096, help="context tokens per sequence")
    csrv.add_argument("--parallel", type=int, default=4, help="sequences decoded together per replica")
    csrv.add_argument("--ram-cache-mb", type=int, default=2048, help="RAM tier budget per replica")
    csrv.add_argument("--disk-cache-mb", type=int, default=8192, help="disk tier budget per replica; 0: none")
    csrv.add_argument("--kv-dir", help="disk tier directory on every node (default: $ERLLAMA_CACHE_DIR/kv-cluster)")
    csrv.add_argument("--private-kv", action="store_true", help="one disk tier directory per replica, not shared")

    pull = sub.add_parser("pull", parents=[common], help="fetch a model into the store")
    pull.add_argument("source", help="catalog name (smollm2:135m), hf://owner/repo/file.gguf, https:// URL, or path")
    pull.add_argument("--name", help="install under this name:tag (default: the source's name)")
    pull.add_argument("--sha256", help="the digest the file must have")

    run = sub.add_parser("run", parents=[common], help="chat with a model (through a daemon when one runs)")
    run.add_argument("model", help="a store model (catalog models are pulled first) or a GGUF file")
    run.add_argument("prompt", nargs="*", help="the prompt (default: stdin; a chat on a terminal)")
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--ctx", type=int, default=4096, help="context tokens (in-process runs)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads (in-process runs)")
    run.add_argument("--raw", action="store_true", help="no chat template: the prompt as it is (in-process runs)")
    run.add_argument("--local", action="store_true", help="run in this process even when a daemon is up")
    run.add_argument("--kv-dir", help="disk tier of the KV-state cache (default: $ERLLAMA_CACHE_DIR/kv)")
    run.add_argument("-v", "--verbose", action="store_true", help="show time to first token, speed and cache hits")

    for name, aliases, text in (("list", ["ls"], "list the store's models"),):
        sub.add_parser(name, aliases=aliases, parents=[common], help=text)
    show = sub.add_parser("show", parents=[common], help="describe a model of the store")
    show.add_argument("model")
    show.add_argument("--template", action="store_true", help="print the chat template only")
    rm = sub.add_parser("rm", parents=[common], help="delete models from the store (a live daemon unloads them)")
    rm.add_argument("models", nargs="+")
    sub.add_parser("ps", parents=[common], help="a running daemon's loaded models and cache tiers")
    stop = sub.add_parser("stop", parents=[common], help="unload a model from a running daemon")
    stop.add_argument("model")
    sub.add_parser("version", parents=[common], help="erllama's and llama.cpp's versions")

    cache = sub.add_parser("cache", help="what the KV-state cache holds (a running daemon's, or a kv directory's)")
    ksub = cache.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    where = argparse.ArgumentParser(add_help=False, parents=[common])
    where.add_argument("--dir", help="read this kv directory instead of asking the daemon")
    where.add_argument("--model", help="rows of this model (with --dir: its vocabulary shows their text)")
    kls = ksub.add_parser("ls", parents=[where], help="rows, most recently used first")
    kls.add_argument("--limit", type=int, default=50, help="rows shown (default: 50)")
    kshow = ksub.add_parser("show", parents=[where], help="one row (a unique key prefix will do)")
    kshow.add_argument("key")
    krm = ksub.add_parser("rm", parents=[where], help="remove rows (key prefixes), or --all")
    krm.add_argument("keys", nargs="*")
    krm.add_argument("--all", action="store_true", help="every row (of --model, when given)")
    ksub.add_parser("stats", parents=[where], help="per tier: rows, tokens, bytes; hits in tokens")
    return parser


def _exit_code(exc: ErllamaError) -> int:
    if isinstance(exc, UnknownModelError | UnknownCacheRowError):
        return EXIT_CODES["not_found"]
    if isinstance(exc, DaemonUnavailableError):
        return EXIT_CODES["no_daemon"]
    if isinstance(exc, ChecksumError):
        return EXIT_CODES["verify"]
    if isinstance(exc, InvalidInputError):
        return EXIT_CODES["invalid"]
    return EXIT_CODES["error"]


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one command; returns its exit code (never raises for the errors it expects)."""
    env = dict(os.environ) if env is None else env
    try:
        parser = _parser()
        args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
        if extra and args.command == "run" and not any(x.startswith("-") for x in extra):
            args.prompt = [*args.prompt, *extra]  # words of the prompt after options: `run m -v say hi`
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, or a usage error argparse already explained
        return int(exc.code or 0)
    out = Output(as_json=getattr(args, "json", False))
    from erllama.cli import commands
    from erllama.cli.cache import cmd_cache
    from erllama.cli.run import run
    from erllama.cli.serve import serve

    table: dict[str, Command] = {
        "pull": commands.cmd_pull,
        "list": commands.cmd_list,
        "ls": commands.cmd_list,
        "show": commands.cmd_show,
        "rm": commands.cmd_rm,
        "ps": commands.cmd_ps,
        "stop": commands.cmd_stop,
        "version": commands.cmd_version,
        "run": run,
        "cache": cmd_cache,
    }
    try:
        if args.command == "serve":
            return serve(args, env, out)
        if args.command == "cluster":
            from erllama.cli.cluster import cluster_serve

            return cluster_serve(args, env, out)
        host = args.host or env.get("ERLLAMA_HOST") or DEFAULT_HOST
        with Daemon(host, api_key=env.get("ERLLAMA_API_KEY")) as daemon:
            return table[args.command](args, env, out, daemon)
    except ErllamaError as exc:
        code = _exit_code(exc)
        if out.as_json:
            out.result({"error": str(exc), "exit_code": code})
        out.note(f"erllama: error: {exc}")
        return code
    except KeyboardInterrupt:
        out.note("erllama: interrupted")
        return 130


def console() -> None:
    """The ``erllama`` console script."""
    sys.exit(main())
