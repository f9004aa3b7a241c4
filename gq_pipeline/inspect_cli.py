"""``gq inspect``: what is in a token output, and is it healthy?

Counts (shards, samples, and the manifest's inputs/tokenized/errors with its ``tokenized + errors == inputs``
invariant checked against the files), fingerprints (a mix is reported, not refused: this is the tool you run to find
out), errors by kind from the output's error files (``.gq/errors/*.parquet``; ``errors/`` in version-1 outputs), and
codebook usage: a token histogram, the share of codes used and the perplexity ``exp(entropy)``. Low usage or
perplexity flags a collapsed or mismatched tokenizer before anyone trains on the tokens. Exit status 1 when
something is wrong (unreadable shard, mixed codebooks, counts that disagree).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarize token shards: counts, fingerprints, errors, codebook usage",
                       description="Summarize a gq tokenize output (or any folder/glob of its shards).")
    p.add_argument("shards", help="tokenize output root, its parquet/ or webdataset/ folder, a glob or a file")
    p.add_argument("--format", default="auto", choices=["auto", "parquet", "webdataset"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--plot", metavar="PNG", help="write a PNG of the codebook usage histogram")
    p.add_argument("--limit", type=int, default=0, help="histogram over at most N samples (default: all)")
    p.add_argument("--no-tokens", action="store_true", help="skip the token scan (metadata only)")
    p.set_defaults(func=run)


def token_histogram(shardset, limit: int = 0):
    """(counts per code id as int64 numpy array, samples scanned). Reads only the tokens column of Parquet shards."""
    import numpy as np
    import pyarrow.parquet as pq

    from gq_pipeline.shards import ShardError, iter_tar_rows, tokens_to_int64

    k = shardset.codebook_size or 0
    counts = np.zeros(max(k, 1), np.int64)
    scanned = 0
    for shard in shardset.shards:
        url = shardset.url(shard)
        if shard.format == "parquet":
            try:
                with shardset.fsref.open(shard.path) as f:
                    pf = pq.ParquetFile(f)
                    for g in range(pf.num_row_groups):
                        col = pf.read_row_group(g, columns=["tokens"]).column("tokens").combine_chunks()
                        if limit:
                            col = col.slice(0, limit - scanned)
                        flat = tokens_to_int64(col.flatten().to_numpy(zero_copy_only=False), url, k or None)
                        counts = _add(counts, flat)
                        scanned += len(col)
                        if limit and scanned >= limit:
                            return counts, scanned
            except ShardError:
                raise
            except Exception as e:  # noqa: BLE001
                raise ShardError(f"{url}: unreadable ({type(e).__name__}: {e})") from e
        else:
            for s in iter_tar_rows(shardset.fsref, shard, 0, shard.num_rows, codebook_size=k or None):
                counts = _add(counts, s["tokens"].numpy().reshape(-1))
                scanned += 1
                if limit and scanned >= limit:
                    return counts, scanned
    return counts, scanned


def _add(counts, flat):
    import numpy as np

    binc = np.bincount(flat, minlength=len(counts))
    if len(binc) > len(counts):
        counts = np.concatenate([counts, np.zeros(len(binc) - len(counts), np.int64)])
    counts[: len(binc)] += binc
    return counts


def usage_stats(counts, codebook_size: int | None) -> dict:
    """The token distribution in the one usage vocabulary (``gq_model.metrics.usage_summary``: used, usage,
    entropy_bits, perplexity), plus the ten most frequent codes."""
    import numpy as np

    from gq_model.metrics.codebook_usage import usage_summary

    counts = np.asarray(counts, dtype=np.int64)
    k = codebook_size or len(counts)
    s = usage_summary(counts, k, rounded=False)
    if not s["tokens"]:
        return {**s, "top": []}
    top = np.argsort(-counts, kind="stable")[:10]
    return {**s, "max_entropy_bits": float(np.log2(k)), "top": [[int(i), int(counts[i])] for i in top if counts[i]]}


def plot_usage(counts, stats: dict, path: str) -> None:
    import io

    import fsspec
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.plot(np.arange(len(counts)), counts, lw=0.5, drawstyle="steps-mid")
    a.set(xlabel="code id", ylabel="count", title="token histogram")
    ranked = np.sort(counts)[::-1]
    ranked = ranked[ranked > 0]
    b.loglog(np.arange(1, len(ranked) + 1), ranked if len(ranked) else [1])
    b.set(xlabel="rank", ylabel="count", title="codes by frequency")
    fig.suptitle(f"usage {stats['usage']:.1%} of {stats['codebook_size']} codes, perplexity {stats['perplexity']:.1f}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())


def build_report(args: argparse.Namespace) -> dict:
    from collections import Counter

    from gq_pipeline.shards import FingerprintMismatchError, ShardError, list_shards, read_error_tables, read_manifest

    ss = list_shards(args.shards, args.format, strict=False)
    report: dict = {"url": args.shards, "format": ss.format, "shards": len(ss.shards), "samples": ss.num_samples,
                    "unreadable": [msg for _, msg in ss.problems], "problems": []}
    report["codebook_fingerprints"] = dict(Counter(str(s.codebook_fingerprint) for s in ss.shards))
    report["model_fingerprints"] = dict(Counter(str(s.model_fingerprint) for s in ss.shards))
    report["codebook_size"] = ss.codebook_size
    try:
        report["codebook_fingerprint"] = ss.check_fingerprints()
        mixed = False
    except FingerprintMismatchError as e:
        report["codebook_fingerprint"], mixed = None, True
        report["problems"].append(str(e))
    if ss.committed:  # files a plain reader sees that no record covers (crash leftovers of old runs, copies)
        from gq_pipeline.commitset import read_records, uncommitted_files

        lay = ss.layout
        extra = uncommitted_files(ss.fsref.fs, ss.root, read_records(ss.fsref.fs, ss.root, layout=lay) or {}, lay)
        report["uncommitted_files"] = extra
        if extra:
            report["problems"].append(f"{len(extra)} file(s) no commit record covers (e.g. {extra[0]}): gq's readers "
                                      f"skip them, plain Parquet/WebDataset readers do not; `gq gc` removes them")
    _check_schema(ss, report)
    manifest = read_manifest(ss.fsref, ss.root)
    errors, bad_errors = read_error_tables(ss.fsref, ss.root, ss.error_files)
    report["unreadable"] += [msg for _, msg in bad_errors]
    by_kind = dict(Counter(errors.column("error").to_pylist())) if errors is not None else {}
    report["errors"] = {"total": sum(by_kind.values()), "by_kind": by_kind}
    if manifest is not None:
        report["manifest"] = {k: manifest.get(k) for k in ("inputs", "tokenized", "errors", "errors_by_kind",
                                                             "codebook_fingerprint", "model_fingerprint")}
        _check_manifest(manifest, report, by_kind, ss)
    else:
        report["manifest"] = None
    if not args.no_tokens and ss.shards and not mixed:
        try:
            counts, scanned = token_histogram(ss, args.limit)
        except ShardError as e:
            report["unreadable"].append(str(e))
        else:
            report["token_stats"] = dict(usage_stats(counts, ss.codebook_size), samples_scanned=scanned)
            if args.plot:
                plot_usage(counts, report["token_stats"], args.plot)
                report["plot"] = args.plot
    return report


def _check_schema(ss, report: dict) -> None:
    """The output's declared pass-through columns (format version 2: one schema per output), and any Parquet shard
    whose columns differ from them (its record lists its columns: no footer is read)."""
    declared = ss.passthrough_schema
    report["passthrough_columns"] = declared.names if declared is not None else None
    if declared is None or ss.format != "parquet":
        return
    for shard in ss.shards:
        extra = [c for c in shard.columns if c not in TOKEN_AND_CORE]
        if shard.columns and extra != declared.names:
            report["problems"].append(f"{ss.url(shard)} has pass-through columns {extra}, the output declares "
                                      f"{declared.names}")


TOKEN_AND_CORE = ("key", "source", "member", "tokens", "token_shape", "width", "height", "latent", "latent_shape")


def _check_manifest(manifest: dict, report: dict, by_kind: dict, ss) -> None:
    problems = report["problems"]
    inputs, tokenized, errors = (manifest.get(k) for k in ("inputs", "tokenized", "errors"))
    if None not in (inputs, tokenized, errors) and tokenized + errors != inputs:
        problems.append(f"manifest: tokenized {tokenized} + errors {errors} != inputs {inputs}")
    if tokenized is not None and not report["unreadable"] and tokenized != ss.num_samples:
        problems.append(f"the manifest says {tokenized} samples were tokenized, the {ss.format} shards hold "
                        f"{ss.num_samples}")
    if errors is not None and sum(by_kind.values()) != errors:
        problems.append(f"the manifest counts {errors} errors, the error files hold {sum(by_kind.values())}")
    fp = manifest.get("codebook_fingerprint")
    if fp and report.get("codebook_fingerprint") and fp != report["codebook_fingerprint"]:
        problems.append(f"the manifest's codebook {fp} differs from the shards' {report['codebook_fingerprint']}")


def format_text(r: dict) -> str:
    lines = [f"{r['url']}  ({r['format']})",
             f"  shards {r['shards']}   samples {r['samples']}",
             f"  codebook {r['codebook_fingerprint'] or 'MIXED/UNKNOWN'} (size {r['codebook_size']})   "
             f"model(s) {', '.join(f'{k}: {v} shards' for k, v in r['model_fingerprints'].items())}"]
    m = r.get("manifest")
    if m:
        lines.append(f"  manifest: inputs {m['inputs']}  tokenized {m['tokenized']}  errors {m['errors']}")
    if r.get("passthrough_columns") is not None:
        lines.append(f"  pass-through columns: {', '.join(r['passthrough_columns']) or 'none'}")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"]["by_kind"].items())) or "none"
    lines.append(f"  errors: {r['errors']['total']} ({kinds})")
    t = r.get("token_stats")
    if t:
        lines.append(f"  tokens: {t['tokens']} from {t['samples_scanned']} samples; codes used {t['used']}/"
                     f"{t['codebook_size']} ({t['usage']:.1%}); perplexity {t['perplexity']:.1f}; entropy "
                     f"{t['entropy_bits']:.2f}/{t.get('max_entropy_bits', 0):.2f} bits")
        lines.append("  top codes: " + ", ".join(f"{c}×{n}" for c, n in t["top"][:5]))
    if r.get("plot"):
        lines.append(f"  plot: {r['plot']}")
    for msg in r["unreadable"]:
        lines.append(f"  UNREADABLE: {msg}")
    for msg in r["problems"]:
        lines.append(f"  PROBLEM: {msg}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = build_report(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(format_text(report))
    return 1 if report["unreadable"] or report["problems"] else 0
