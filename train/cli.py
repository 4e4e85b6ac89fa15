"""`train` command: run / resume / sweep / report / config / eval / calibrate / export / inspect.

The options of `run` are config keys (config_option: type, choices, help and default from
TrainConfig); the commands run their work through shared.cli_common.run_user_errors, which prints a
user error (shared.errors.UserError) on one line and exits 2."""

from __future__ import annotations

import click

from shared.cli_common import AUTOCAST_TYPE, COUNT, format_count, one_line_warnings, run_user_errors
from train.config import field_help, get_default_cfg, key_facts, load_toml, parse_set, update_cfg

HELP = field_help()


def config_option(key: str):
    """The option --KEY (dashes for underscores) of config key `key`: its type, choices, help and
    shown default come from TrainConfig's declaration (a token count takes 50M, 1e6). It defaults
    to None, so that only the options given override a --config file."""
    facts, default = key_facts(key), getattr(get_default_cfg(), key)
    count, note = facts.count, "Accepts 20k, 50M, 1e6." if facts.count else ""
    kind = {bool: None, int: COUNT if count else int, float: float, str: None}[facts.type]
    if facts.choices is not None:
        kind = click.Choice(facts.choices)
    text = " ".join(filter(None, [HELP[key], note]))
    if default not in (None, "") and facts.type is not bool:
        shown = format_count(default) if count else f"{default:g}" if facts.type is float else str(default)
        text += f" [default: {shown}]"
    name = "--" + key.replace("_", "-")
    if facts.type is bool:
        return click.option(name, is_flag=True, default=None, help=text)
    return click.option(name, type=kind, help=text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train sparse autoencoders on a harvested activation cache."""
    one_line_warnings()


@main.command()
@config_option("store")
@config_option("site")
@config_option("arch")
@config_option("in_site")
@config_option("out_site")
@config_option("sparsity")
@config_option("k")
@config_option("dict_size")
@config_option("expansion")
@config_option("lr")
@config_option("batch_size")
@config_option("tokens")
@config_option("seed")
@config_option("autocast")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of config keys (flat, or under [train]).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key; repeatable (see `train config`).")
@config_option("out")
@config_option("checkpoint_every")
@config_option("allow_unsealed")
@config_option("wandb_mode")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(config_file, sets, quiet, **options) -> None:
    """Train one SAE or transcoder. Precedence: defaults < --config file < options < --set.

    A transcoder: --arch transcoder (or skip_transcoder, clt) --in-site ... --out-site ...
    --sparsity topk|batchtopk|jumprelu|vanilla (its keys apply: --k, --set l0_coeff=...).

    The last line printed is the run's checkpoint folder.
    """
    from train.training import train_sae

    def build():
        cfg = get_default_cfg()
        if config_file:
            cfg = update_cfg(cfg, **load_toml(config_file))
        cfg = update_cfg(cfg, **{k: v for k, v in options.items() if v is not None})
        return update_cfg(cfg, **parse_set(list(sets)))

    cfg = run_user_errors(build)
    sae, run_dir = run_user_errors(train_sae, None, cfg, progress=not quiet)
    _print_results(run_dir)
    click.echo(str(run_dir))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--tokens", type=COUNT, help="Raise the run's token budget (e.g. 20M).")
@click.option("--wandb-mode", type=click.Choice(key_facts("wandb_mode").choices), help=HELP["wandb_mode"])
@click.option("--quiet", is_flag=True, help="No progress bar.")
def resume(checkpoint, tokens, wandb_mode, quiet) -> None:
    """Resume a run folder, one of its checkpoint folders, or a sweep folder, from the newest
    good checkpoint.

    The run finishes exactly as it would have without the interruption.
    """
    import json

    from train.checkpoints import latest_checkpoint
    from train.layout import RunLayout
    from train.runs import load_run_config
    from train.sweep import is_sweep_dir, resume_sweep, sweep_runs
    from train.training import resume_training

    if is_sweep_dir(checkpoint):  # under torchrun its unfinished SAEs are spread over the ranks again
        runs = run_user_errors(sweep_runs, checkpoint)
        if all(RunLayout(d).done.exists() for d, _ in runs):
            if _is_rank0():
                click.echo(f"sweep {checkpoint} is already complete (all {len(runs)} SAEs finished); nothing to "
                           f"resume. Its results: `train report {checkpoint}`", err=True)
                click.echo(str(checkpoint))
            return
        sweep_dir = run_user_errors(resume_sweep, checkpoint, progress=not quiet)
        if _is_rank0():
            _print_sweep(sweep_dir)
            click.echo(str(sweep_dir))
        return

    def build():
        run_dir = latest_checkpoint(checkpoint)[0]
        cfg = load_run_config(run_dir)
        changes = {"tokens": tokens, "wandb_mode": wandb_mode}
        return run_dir, update_cfg(cfg, **{k: v for k, v in changes.items() if v is not None})

    run_dir, cfg = run_user_errors(build)
    done = RunLayout(run_dir).done
    trained = json.loads(done.read_text())["tokens"] if done.exists() else None
    if trained is not None and (tokens is None or tokens <= trained):
        click.echo(f"{run_dir} is already complete ({trained:,} tokens trained, done.json); nothing to resume. "
                   f"To train it further, pass --tokens with more than {format_count(trained)}", err=True)
        click.echo(str(run_dir))
        return
    sae, run_dir = run_user_errors(resume_training, None, cfg, checkpoint, progress=not quiet)
    _print_results(run_dir)
    click.echo(str(run_dir))


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option("--store", help="Override base.store of the spec.")
@click.option("--out", help="Override base.out (the sweep folder is created inside).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a base config key; repeatable.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(spec, store, out, sets, quiet) -> None:
    """Train every SAE of a TOML sweep spec together, reading each batch once.

    The spec (e.g. pipelines/sweeps/smollm2_k.toml):

    \b
      name = "smollm2-l8-k"     # optional: the sweep folder is sweep-NAME-HASH
      [base]                    # config keys (`train config`) every SAE shares
      store = "/data/acts"
      tokens = "1M"             # token counts take 1M, 20k, 1e6, 1000000
      [grid]                    # lists: every combination is one SAE
      arch = ["topk", "batchtopk"]
      k = [16, 32]

    A grid may vary any key except those one data stream fixes for all SAEs (`train config`
    marks them "one value for every SAE of a sweep": store, site, batch_size, tokens, seed,
    window_shards, heldout_shards, normalize, drop_bos, mask_token_ids, mask_norm_multiple,
    mask_norm_threshold, checkpoint_every, out). Optional top-level
    keys: devices = ["cuda:0", "cuda:1"] (spread the SAEs of one process over GPUs) and
    distribute = "sae". --store, --out and --set KEY=VALUE override the spec: its [base], and its
    [grid] too (a key set on the command line takes that one value).

    Under torchrun (`torchrun --nproc_per_node=R -m train sweep SPEC`) the SAEs are spread over
    the ranks (spec key distribute = "sae", the default): rank r trains the SAEs with index
    i % R == r, every rank reads the whole of every batch, and each SAE ends as in one process.
    Sweeps are never data-parallel. Resume an interrupted sweep with `train resume SWEEP_FOLDER`,
    on any number of ranks. The last line printed is the sweep folder.
    """
    from train.sweep import run_sweep

    overrides = {k: v for k, v in {"store": store, "out": out}.items() if v is not None}
    overrides.update(run_user_errors(parse_set, list(sets)))
    sweep_dir = run_user_errors(run_sweep, spec, overrides, progress=not quiet)
    if _is_rank0():
        _print_sweep(sweep_dir)
        click.echo(str(sweep_dir))


def _is_rank0() -> bool:
    """Whether this process prints a sweep's results: rank 0 under torchrun, or a single process."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _print_sweep(sweep_dir) -> None:
    import json

    from train.layout import SweepLayout

    layout = SweepLayout(sweep_dir)
    for rec in json.loads(layout.spec.read_text())["runs"]:
        click.echo(f"{rec['run_dir']}:", err=True)
        _print_results(layout.run(rec["run_dir"]).root)


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def report(path) -> None:
    """Write PNG figures and a Markdown summary for a run folder or a sweep folder."""
    from train.report import write_report

    md = run_user_errors(write_report, path)
    click.echo(str(md))


@main.command("config")
def show_config() -> None:
    """List every config key with its default and meaning."""
    for key, value in get_default_cfg().to_dict().items():
        click.echo(f"{key:24s} {value!r:>14}  {HELP[key]}{_facts_note(key)}")


def _facts_note(key: str) -> str:
    """What `train config` says of a key's facts besides its meaning, e.g. " [resume may change it]"."""
    facts = key_facts(key)
    notes = [{False: "not in the run name", "when_set": "in the run name when not the default"}.get(facts.identity),
             "resume may change it" if facts.resumable else None,
             "one value for every SAE of a sweep" if facts.sweep_shared else None]
    notes = [n for n in notes if n]
    return f" [{'; '.join(notes)}]" if notes else ""


@main.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--batches", type=click.IntRange(1), default=50, show_default=True,
              help="Held-out store batches (of the run's batch_size) for the reconstruction figures.")
@click.option("--max-contexts", type=click.IntRange(1), default=64, show_default=True,
              help="Held-out token contexts for the CE / KL figures.")
@click.option("--lm-batch-size", type=click.IntRange(1), default=8, show_default=True, help="Contexts per LM forward pass.")
@click.option("--model", help="LM to load instead of the one the cache records (hub id, HF folder or .gguf).")
@click.option("--skip-lm", is_flag=True, help="Reconstruction figures only (no LM is loaded).")
@click.option("--device", help="auto, cpu, cuda ... [default: the run's device setting]")
@click.option("--store", "store_path", help="The run's cache, if it moved.")
@click.option("--heldout-shards", type=click.IntRange(1), help="Evaluate on the cache's last N shards instead of the run's held-out shards.")
@click.option("--autocast", type=AUTOCAST_TYPE, default="auto", show_default=True,
              help="LM compute dtype; auto = the harvest's (bf16 on CUDA when the cache was harvested so); bfloat16 = bf16.")
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write eval.json [default: into CHECKPOINT]; saebench_core.json goes beside it.")
@click.option("--wandb-mode", type=click.Choice(key_facts("wandb_mode").choices), help="[default: the run's]")
def eval_cmd(checkpoint, **options) -> None:
    """Evaluate a run folder's newest checkpoint (or one checkpoint folder) on held-out data.

    Reconstruction (MSE, explained variance, cosine, L0, L1, dead and dense latents, density
    histogram) on held-out cache rows, and the LM's CE loss clean / with the SAE spliced in /
    zero- and mean-ablated, CE-loss score and KL on the held-out contexts. BatchTopK and
    Matryoshka are reported with their calibrated threshold and with batch top-k, Matryoshka also
    with each inner prefix alone. Beside eval.json, saebench_core.json holds the exported
    encoding's figures in SAEBench's core-eval layout and definitions. Prints a table; the last
    line is the path of eval.json.
    """
    from train.evaluation import evaluate_checkpoint, format_table

    from train.saebench import SAEBENCH_FILENAME

    results, dest = run_user_errors(evaluate_checkpoint, checkpoint, **options)
    click.echo(format_table(results), err=True)
    click.echo(f"  SAEBench core layout: {dest.parent / SAEBENCH_FILENAME}", err=True)
    click.echo(str(dest))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--kind", type=click.Choice(key_facts("threshold_kind").choices),
              help="Threshold definition [default: the run's threshold_kind].")
@click.option("--batches", type=click.IntRange(1), help="Held-out batches to calibrate on [default: the run's threshold_batches].")
@click.option("--device", help="auto, cpu, cuda ... [default: the run's device setting]")
@click.option("--store", "store_path", help="The run's cache, if it moved.")
@click.option("--heldout-shards", type=click.IntRange(1), help="Calibrate on the cache's last N shards instead of the run's held-out shards.")
def calibrate(checkpoint, **options) -> None:
    """Calibrate a BatchTopK or Matryoshka checkpoint's inference threshold on held-out rows.

    Rewrites that checkpoint (atomically, same step) with the threshold, so that it can be
    evaluated per token and exported. Intermediate checkpoints are not calibrated by training.
    """
    from train.evaluation import calibrate_checkpoint

    rec = run_user_errors(calibrate_checkpoint, checkpoint, **options)
    click.echo(f"calibrated {rec['threshold_kind']} threshold on {rec['batches']} held-out batches: inference L0 "
               f"{rec['inference_l0']:.2f} (k = {rec['k']}), explained variance {rec['explained_variance']:.4f}",
               err=True)


@main.command()
@click.argument("checkpoint", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["saelens", "circuit-tracer"]), default="saelens", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for cfg.json and sae_weights.safetensors (circuit-tracer: config.yaml and the layers' files).")
@click.option("--model-name", help="metadata.model_name [default: the cache's model id].")
@click.option("--store", "store_path", help="The run's cache, if it moved (needed for the scaling factor and provenance).")
@click.option("--force", is_flag=True, help="Overwrite an existing export in --out.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO",
              help="Then upload the folder to this hub model repository (needs the network and a login).")
def export(checkpoint, fmt, out_dir, model_name, store_path, force, push_to_hub) -> None:
    """Export a run folder's newest checkpoint (or one checkpoint folder) for SAELens 6, or for
    circuit-tracer 0.5 a clt or a set of per-layer transcoders (one CHECKPOINT per layer, layers 0..n-1).

    The dataset scaling is folded into the weights (the export takes raw activations); BatchTopK
    and Matryoshka are written as JumpReLU with their calibrated threshold, Gated as SAELens'
    gated. Beside cfg.json and the weights: a model card README.md (recipe, provenance hashes,
    training tokens, eval figures when the checkpoint has an eval.json) and its
    saebench_core.json. The last line printed is the folder.
    """
    from train.export import export_checkpoint

    out = run_user_errors(export_checkpoint, checkpoint, out_dir, fmt=fmt, model_name=model_name,
                          store_path=store_path, force=force, push_to_hub=push_to_hub)
    click.echo(str(out))


@main.command("inspect")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the site (index.html opens from disk); refused if it exists and is not empty, unless --force.")
@click.option("--shards", help="Cache shards to stream, e.g. 3,5-7 [default: the run's held-out shards].")
@click.option("--tokens", type=COUNT, help="Stop after this many encoded rows (e.g. 200k) [default: every row of the shards].")
@click.option("--top", type=click.IntRange(1), default=20, show_default=True, help="Top-activating examples kept per latent.")
@click.option("--bands", type=click.IntRange(1), default=8, show_default=True,
              help="Activation bands (equal slices of each latent's histogram range, a power of two) sampled for examples.")
@click.option("--per-band", type=click.IntRange(0), default=3, show_default=True,
              help="Uniformly sampled examples kept per band (0: none).")
@click.option("--bins", type=click.IntRange(1), default=64, show_default=True, help="Histogram bins per latent (a power of two).")
@click.option("--before", type=click.IntRange(0), default=16, show_default=True, help="Context tokens shown before each example.")
@click.option("--after", type=click.IntRange(0), default=4, show_default=True, help="Context tokens shown after each example.")
@click.option("--batch-rows", type=click.IntRange(1), default=1024, show_default=True,
              help="Rows per encoder batch (whole contexts); its latents take batch_rows x dict size x 4 bytes.")
@click.option("--logit-tokens", type=click.IntRange(1), default=10, show_default=True,
              help="Most promoted and most suppressed output tokens kept per latent.")
@click.option("--neighbours", type=click.IntRange(1), default=5, show_default=True, help="Nearest latents (decoder cosine) kept per latent.")
@click.option("--device", default="cpu", show_default=True, help="Where the encoder runs: cpu, cuda, cuda:N or auto.")
@click.option("--store", help="The run's cache, if it moved.")
@click.option("--model", help="LM for the logit effect and tokenizer, instead of the one the cache records (hub id, HF folder or .gguf).")
@click.option("--tokenizer", help="Tokenizer for the contexts, instead of the model's (hub id, HF folder or .gguf).")
@click.option("--no-logits", is_flag=True, help="Do not load the LM: no logit effect.")
@click.option("--token-ids", is_flag=True, help="Show token ids instead of loading a tokenizer.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out (only once the new site is complete).")
@click.option("--serve", is_flag=True, help="Then serve the site on 127.0.0.1 until Ctrl-C (prints the URL).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port for --serve (0: a free port).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def inspect_cmd(checkpoint, out_dir, tokens, serve, port, quiet, **options) -> None:
    """Build a feature browser of a run folder's newest checkpoint (or one checkpoint folder).

    One pass of the SAE's encoder (in the run's normalised space; BatchTopK with its calibrated
    threshold) over cache shards keeps, per latent, its top activations, samples across its
    activation range, a histogram, its frequency and mean activation. Contexts come from the
    cache's tokens (no LM pass); the logit effect needs the LM. The site opens from disk
    (DIR/index.html). The last line printed is the site folder.
    """
    from train.inspector.build import Settings, inspect_checkpoint
    from train.inspector.site import serve as serve_site

    settings = Settings(tokens=tokens, progress=not quiet, **options)
    site, meta = run_user_errors(inspect_checkpoint, checkpoint, out_dir, settings)
    p = meta["pass"]
    click.echo(f"inspected {p['rows']:,} rows of shards {meta['shards_text']} in {p['seconds']:.1f} s "
               f"({p['tokens_per_second'] or 0:,.0f} tokens/s); {meta['d_sae']:,} latents", err=True)
    for note in meta["notes"]:
        click.echo(f"  note: {note}", err=True)
    click.echo(f"  open {site / 'index.html'}", err=True)
    click.echo(str(site))
    if serve:
        run_user_errors(serve_site, site, port, announce=lambda line: click.echo(line, err=True))


def _print_results(run_dir) -> None:
    import json

    from train.layout import RunLayout

    done = RunLayout(run_dir).done
    if not done.exists():
        return
    res = json.loads(done.read_text()).get("results", {})
    held = res.get("heldout")
    if held:
        line = (f"held-out: explained variance {held['explained_variance']:.4f}, mse {held['mse']:.4g}, "
                f"L0 {held['l0']:.2f}, never fired {held['never_fired_fraction']:.2%}")
        if "inference_l0" in res:
            line += f" (inference with {res['threshold_kind']} threshold; k = {res['k']})"
        click.echo("  " + line, err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
