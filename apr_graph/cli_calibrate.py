"""``apr calibrate``: measure what parallel threads buy on a server, and remember it.

    apr calibrate --base-url http://localhost:8080/v1 --model qwen2.5-1.5b
    apr calibrate --json          # the profile as JSON on stdout

It takes ``apr ask``'s options and exit codes, prints each step on stderr, then the table of
what k streams decode together, and stores the profile per endpoint in the speed file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from apr_graph.cli_common import (
    EXIT_USAGE,
    CliError,
    checked_client,
    loading,
    local_choice,
    settings_from,
)

if TYPE_CHECKING:
    from apr_graph.settings import AprSettings
    from apr_graph.speed import SpeedProfile

__all__ = ["add_calibrate_command", "calibrate_command", "describe_profile"]


def add_calibrate_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add ``apr calibrate`` to the ``apr`` subcommands, with ``common``'s options."""
    parser = commands.add_parser(
        "calibrate",
        parents=[common],
        help="measure what parallel threads buy on this server (about 30 s); remembered",
    )
    parser.add_argument("--streams", type=int, default=4, help="most streams at once [4]")
    parser.add_argument(
        "--tokens", type=int, default=96, help="tokens each timed reply is asked for [96]"
    )
    parser.add_argument(
        "--speed-file",
        type=Path,
        help="where profiles are kept [env APR_SPEED_FILE, ~/.cache/apr-graph/speed.json]",
    )


def describe_profile(profile: SpeedProfile) -> str:
    """The profile as a small table: streams, aggregate tokens/s, gain; prefill; latency."""
    lines = ["streams  tokens/s   gain"]
    for streams in sorted(profile.decode_tps):
        tps = profile.decode_tps[streams]
        lines.append(f"{streams:>7}  {tps:>8.1f}  {profile.gain(streams):>4.2f}x")
    prefill = f"{profile.prefill_tps:,.0f} tokens/s" if profile.prefill_tps else "not timed"
    lines.append(f"prefill: {prefill}")
    if profile.first_token_s is not None:
        lines.append(f"first token: {profile.first_token_s:.3f} s")
    return "\n".join(lines)


async def _measure(
    settings: AprSettings, args: argparse.Namespace, notice: Callable[[str], None]
) -> SpeedProfile:
    with loading():
        from apr_graph.speed import calibrate

    async with checked_client(settings) as client:
        return await calibrate(client, streams=args.streams, tokens=args.tokens, on_progress=notice)


def calibrate_command(args: argparse.Namespace) -> int:
    """Run ``apr calibrate``; errors are raised for ``apr``'s main to report."""
    # apr's own option handling, as apr ask uses it (cli imports this module first)
    from apr_graph.speed import SpeedStore, default_speed_file
    from apr_graph.speed_store import profile_key

    if args.streams < 1 or args.tokens < 16:
        raise CliError("--streams must be at least 1 and --tokens at least 16", EXIT_USAGE)
    settings = settings_from(args)
    local = local_choice(args, settings)

    def notice(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr)

    with ExitStack() as stack:
        if local is not None:  # its key names the model file (speed_endpoint), not the port
            settings, _, _ = local.start(stack, settings, notice=notice)
        assert settings.base_url is not None  # local_choice picks a model otherwise
        key = profile_key(settings, settings.base_url)  # the key runs decide with
        profile = asyncio.run(_measure(settings, args, notice))
    path = args.speed_file or default_speed_file()
    SpeedStore(path).put(key, profile)
    if args.json:
        print(json.dumps({"endpoint": key, "speed_file": str(path), **profile.to_json()}))
    else:
        print(describe_profile(profile))
        print(f"stored for {key} in {path}")
    return 0
