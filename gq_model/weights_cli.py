"""``gq weights fetch|list``: pre-fetch the perceptual-loss and metric weight files into gq's cache, and show it.

Fetching once (where there is network) is what lets training with LPIPS and ``gq eval``'s LPIPS / rFID run offline
later; resolution and verification live in :mod:`gq_model.weights`.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gq_model.weights import GROUPS

    p = sub.add_parser("weights", help="fetch / list the LPIPS and FID weight files (the cache gq reads them from)",
                       description="Weight files resolve as: explicit path, then $GQ_CACHE/weights (default "
                                   "~/.cache/gq/weights), then (LPIPS heads) an installed lpips package, then a "
                                   "verified download from the canonical URL or $GQ_WEIGHTS_BASE_URL/<name>.")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    f = wsub.add_parser("fetch", help="download (and verify) weight files into the cache")
    f.add_argument("names", nargs="*", choices=[*GROUPS, "all"], metavar="NAME",
                   help=f"one or more of {', '.join([*GROUPS, 'all'])} (default: all)")
    f.add_argument("--cache", help="cache root instead of $GQ_CACHE / ~/.cache/gq")
    f.add_argument("--base-url", help="fetch <base-url>/<name> instead of the canonical URLs (a mirror)")
    f.add_argument("--timeout", type=float, default=60.0, help="network timeout per read, seconds")
    f.set_defaults(func=run_fetch)
    ls = wsub.add_parser("list", help="show which weight files are cached, their size and whether they verify")
    ls.add_argument("--cache", help="cache root instead of $GQ_CACHE / ~/.cache/gq")
    ls.add_argument("--json", action="store_true", help="print the rows as JSON")
    ls.add_argument("--no-verify", action="store_true", help="skip hashing the cached files")
    ls.set_defaults(func=run_list)


def run_fetch(args: argparse.Namespace) -> int:
    from gq_model.weights import FILES, WeightsUnavailable, fetch

    try:
        got = fetch(args.names or ["all"], cache=args.cache, base_url=args.base_url, timeout=args.timeout,
                    download=True)
    except WeightsUnavailable as e:
        print(f"gq weights fetch: error: {e}", file=sys.stderr)
        return 1
    for key, r in got.items():
        print(f"{FILES[key].name:40s} {r.source:14s} {'verified' if r.verified else 'NOT verified'}  {r.path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from gq_model.weights import cache_status, weights_dir

    rows = cache_status(args.cache, verify=not args.no_verify)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"cache: {weights_dir(args.cache)}")
    print(f"{'name':40s} {'size':>10s}  {'verified':8s}  path")
    for r in rows:
        if r["cached"]:
            verified = {True: "yes", False: "NO", None: "-"}[r["verified"]]
            print(f"{r['name']:40s} {r['size'] / 1e6:>8.1f}MB  {verified:8s}  {r['path']}")
        elif r["lpips_package"]:
            print(f"{r['name']:40s} {'-':>10s}  {'-':8s}  (not cached; the installed lpips package has it: "
                  f"{r['lpips_package']})")
        else:
            print(f"{r['name']:40s} {'-':>10s}  {'-':8s}  (not cached) {r['url']}")
    bad = [r["name"] for r in rows if r["verified"] is False]
    if bad:
        print(f"corrupt: {', '.join(bad)} (they are deleted and fetched again on next use)", file=sys.stderr)
    return 0
