"""``autoglm models traffic NAME v1=0.9 v2=0.1 --server URL``: the admin API's traffic call.

It sends ``PUT /admin/models/NAME/traffic`` and prints the model's versions and weights once
the server has loaded and verified every version named (exit 0); a refusal prints the
server's message (exit 1); a malformed argument exits 2 before anything is sent.
"""

from __future__ import annotations

import argparse
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
    rule.add_argument("--window", type=float, default=60.0, metavar="SECONDS")
    rule.add_argument("--min-requests", type=int, default=20)
    parser.set_defaults(action=run_traffic)


def _weights(pairs: list[str]) -> dict[str, float]:
    weights = {}
    for pair in pairs:
        version, sep, value = pair.partition("=")
        try:
            weights[version] = float(value)
        except ValueError:
            sep = ""
        if not sep or not version:
            raise ValueError(f"{pair!r} is not VERSION=WEIGHT, e.g. v2=0.1")
    return weights


def run_traffic(args: argparse.Namespace) -> int:
    try:
        weights = _weights(args.weights)
    except ValueError as exc:
        print(f"autoglm models traffic: {exc}", file=sys.stderr)
        return 2
    body: dict = {"weights": weights, "sticky": args.sticky, "policy": args.policy}
    if args.stable:
        body["stable"] = args.stable
    if args.max_error_rate is not None or args.max_p95_ttft is not None:
        body["rollback"] = {
            "max_error_rate": args.max_error_rate,
            "max_p95_ttft_s": args.max_p95_ttft,
            "window_s": args.window,
            "min_requests": args.min_requests,
        }
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
