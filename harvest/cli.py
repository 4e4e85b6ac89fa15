"""`harvest` command: run / info / verify."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import click

from harvest.selection import LAYERS, layer_selection
from shared.cache import COMPRESSIONS, STORAGE_DTYPES, Cache
from shared.cli_common import AUTOCAST_TYPE, COUNT, run_user_errors
from shared.hook_sites import SITE_KINDS
from shared.tokens import BOS_POLICIES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Harvest a language model's activations into a resumable Zarr v3 cache."""


@main.command()
@click.option("--model", required=True, help="Hub id, local Hugging Face folder, or local .gguf file.")
@click.option("--dataset", required=True, help="Hub id, or a local .txt / .jsonl / .parquet file (one document per line/row).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder or URL (s3://bucket/path, gs://...); created, or resumed if it exists.")
@click.option("--layer", "layers", type=LAYERS, multiple=True, required=True,
              help="Layers to hook: an index (8), a range (2-5), a list (1,3) or all; repeatable. "
                   "Every --site at every layer, all in one forward pass.")
@click.option("--site", "site", type=click.Choice(SITE_KINDS), multiple=True, default=("resid_pre",), show_default=True,
              help="Hook site kind in each layer, repeatable (--site mlp_in --site mlp_out): resid_pre / resid_post "
                   "(block input / output), attn_out / mlp_out (what attention / the MLP adds), resid_mid (the residual "
                   "after attention; not in parallel blocks), mlp_in (what the MLP reads: its pre-MLP norm's output).")
@click.option("--tokens", type=COUNT, default="1M", show_default=True, help="Token budget (e.g. 200k, 50M), rounded up to whole contexts.")
@click.option("--context-length", type=click.IntRange(2), default=128, show_default=True, help="Tokens per packed context.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Contexts per forward pass [default: 8 on CPU; on CUDA 8192 tokens' worth (64 contexts of 128)].")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default="float16", show_default=True, help="Storage dtype (float16 overflow is detected).")
@click.option("--text-column", default="text", show_default=True, help="Column holding the text (.jsonl/.parquet/hub).")
@click.option("--split", default="train", show_default=True, help="Dataset split (hub datasets).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ... (auto: CUDA when present).")
@click.option("--shard-tokens", type=COUNT, default="65536", show_default=True, help="Rows per shard, rounded up to whole contexts.")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True, help="none keeps shards memory-mappable.")
@click.option("--bos", type=click.Choice(BOS_POLICIES), default="context", show_default=True, help="context: each context starts with BOS.")
@click.option("--autocast", type=AUTOCAST_TYPE, default="auto", show_default=True, help="Compute dtype; auto = bf16 on CUDA, fp32 on CPU (bfloat16: same as bf16).")
@click.option("--staging", type=click.Path(file_okay=False), help="Local staging folder when --out is a URL [default: $SAEFORGE_STAGING or ~/.cache/saeforge/staging, one per URL].")
@click.option("--space-check/--no-space-check", "space_check", default=True, show_default=True,
              help="Refuse to start (exit 2, nothing written) when the file system of --out lacks the size still to "
                   "write plus a margin; the size is printed first either way (not checked for a URL).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(quiet: bool, layers, site, **options) -> None:
    """Harvest activations (resumes an unfinished cache at --out).

    Under torchrun (RANK/WORLD_SIZE set), shard k goes to rank k mod WORLD_SIZE and the result
    is the same cache as one process makes.
    """
    from harvest.runner import HarvestConfig, run_harvest

    rank, world, barrier = _distributed()
    cfg = HarvestConfig(layers=layer_selection(layers), site=list(site), rank=rank, world_size=world, **options)
    if cfg.device == "auto" and world > 1 and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
    path = run_user_errors(run_harvest, cfg, progress=not quiet, barrier=barrier, log=lambda m: click.echo(m, err=True))
    if rank == 0:
        click.echo(str(path))


def _distributed():
    """(rank, world_size, barrier) from torchrun's environment; (0, 1, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(hours=12))
    return dist.get_rank(), world, dist.barrier


def _cache_path(ctx, param, value: str) -> str:
    """A cache folder that exists, or a URL (checked when opened)."""
    from shared.remote import is_remote

    if not is_remote(value) and not os.path.isdir(value):
        raise click.BadParameter(f"{value!r} is not a folder or a URL (s3://..., gs://...)", ctx, param)
    return value


@main.command()
@click.argument("path", callback=_cache_path)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(path: str, as_json: bool) -> None:
    """Summarise a cache (folder or URL): model, sites, tokens, shards done of planned, dtype, size."""
    from harvest.runner import cache_summary

    s = run_user_errors(cache_summary, path)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"cache        {s['path']}")
    click.echo(f"model        {s['model']} ({s['architecture']})")
    click.echo(f"dataset      {s['dataset']}")
    click.echo(f"sites        {', '.join(s['sites'])}  (d_model {s['d_model']})")
    click.echo(f"tokens       {s['rows']:,} of {s['planned_rows']:,} planned, context {s['context_length']}")
    click.echo(f"shards       {s['shards_done']} of {s['shards_planned']} done, {'sealed' if s['sealed'] else 'NOT sealed'}")
    click.echo(f"storage      {s['dtype']}, compression {s['compression']}, {s['bytes_on_disk'] / 2**20:,.1f} MiB {'stored' if '://' in s['path'] else 'on disk'}")
    for site, v in s["mean_sq_norm"].items():
        click.echo(f"E||x||^2     {site}: {v:.4g}")


@main.command()
@click.argument("path", callback=_cache_path)
@click.option("--repair", is_flag=True,
              help="Move bad shards' ledger records and the seal aside (into ledger/quarantine/, nothing is deleted) "
                   "and print the harvest command that redoes exactly those shards. Exit 0: nothing was wrong; "
                   "1: repaired, rerun the printed command.")
def verify(path: str, repair: bool) -> None:
    """Re-check every shard against its ledger checksum; exit 1 naming each bad or missing shard.

    For a URL the objects on the store are checked."""
    if repair:
        from harvest.repair import repair_cache

        report = run_user_errors(repair_cache, path)
        for line in report.lines():
            click.echo(line)
        sys.exit(report.exit_code)

    def check():
        cache = Cache.open(path, allow_unsealed=True)
        return cache, cache.verify()

    cache, problems = run_user_errors(check)
    for p in problems:
        click.echo(p)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {path}; to redo those shards: harvest verify --repair {path}", err=True)
        sys.exit(1)
    click.echo(f"ok: {len(cache.ledger)} shards verified{'' if cache.sealed else ' (cache not sealed yet)'}")


if __name__ == "__main__":  # pragma: no cover
    main()
