"""``autoglm models traffic NAME v1=0.9 v2=0.1 --server URL``: the admin API's traffic call.

It sends ``PUT /admin/models/NAME/traffic`` and prints the model's versions and weights once
the server has loaded and verified every version named (exit 0); a refusal prints the
server's message (exit 1); a malformed argument exits 2 before anything is sent.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import httpx

__all__ = ["configure_traffic", "run_traffic"]

_TIMEOUT_S = 3600.0  # the server answers once the versions are loaded, which may take minutes


def configure_traffic(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="served model name")
    parser.add_argument(
        "weights", nargs="+", metavar="VERSION=WEIGHT", help="e.g. v1=0.9 v2=0.1; v2=1 swaps"
    )
    parser.add_argument(
        "--server",
        default=os.environ.get("AUTOGLM_SERVER", "http://127.0.0.1:8080"),
        help="server URL (default: $AUTOGLM_SERVER, else http://127.0.0.1:8080)",
    )
    parser.add_argument(
        "--admin-key",
        default=os.environ.get("AUTOGLM_ADMIN_KEY"),
        help="the server's admin_key (default: $AUTOGLM_ADMIN_KEY)",
    )
    parser.add_argument("--sticky", choices=("user", "tenant", "none"), default="none")
    parser.add_argument("--policy", choices=("weighted", "least_loaded"), default="weighted")
    parser.add_argument("--stable", help="version a rollback returns to (default: the largest)")
    rule = parser.add_argument_group("automatic rollback of the canaries")
    rule.add_argument("--max-error-rate", type=float, help="e.g. 0.05")
    rule.add_argument("--max-p95-ttft", type=float, metavar="SECONDS", help="e.g. 2.0")
    rule.add_argument("--window", type=float, metavar="SECONDS", help="default 60")
    rule.add_argument("--min-requests", type=int, help="default 20")
    parser.set_defaults(action=run_traffic)


def _weights(pairs: list[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in pairs:
        version, sep, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            sep = ""
        if not sep or not version:
            raise ValueError(f"{pair!r} is not VERSION=WEIGHT, e.g. v2=0.1")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{pair!r}: a weight is a finite number >= 0, e.g. v2=0.1")
        if version in weights:
            raise ValueError(f"version {version!r} is given twice; give each version once")
        weights[version] = weight
    return weights


def _rollback(args: argparse.Namespace) -> dict | None:
    """The rollback rule of the options; ValueError for --window or --min-requests alone."""
    if args.max_error_rate is None and args.max_p95_ttft is None:
        if args.window is not None or args.min_requests is not None:
            raise ValueError(
                "--window and --min-requests shape a rollback rule: give --max-error-rate "
                "or --max-p95-ttft as well"
            )
        return None
    return {
        "max_error_rate": args.max_error_rate,
        "max_p95_ttft_s": args.max_p95_ttft,
        "window_s": 60.0 if args.window is None else args.window,
        "min_requests": 20 if args.min_requests is None else args.min_requests,
    }


def run_traffic(args: argparse.Namespace) -> int:
    try:
        weights = _weights(args.weights)
        rollback = _rollback(args)
    except ValueError as exc:
        print(f"autoglm models traffic: {exc}", file=sys.stderr)
        return 2
    body: dict = {"weights": weights, "sticky": args.sticky, "policy": args.policy}
    if args.stable:
        body["stable"] = args.stable
    if rollback is not None:
        body["rollback"] = rollback
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    url = f"{args.server.rstrip('/')}/admin/models/{args.name}/traffic"
    try:
        response = httpx.put(url, json=body, headers=headers, timeout=_TIMEOUT_S)
    except httpx.HTTPError as exc:
        print(f"autoglm models traffic: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        print(f"autoglm models traffic: {response.status_code}: {message}", file=sys.stderr)
        return 1
    model = response.json()
    traffic = model["traffic"]
    split = " ".join(f"{v}={w:g}" for v, w in traffic["weights"].items())
    print(f"{model['name']}: {split} (stable {traffic['stable']}, sticky {traffic['sticky']})")
    for version in model["versions"]:
        print(f"  {version['version']}: {version['state']}, weight {version['weight']:g}")
    return 0
