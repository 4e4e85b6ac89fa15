"""`train` command: run / resume."""

from __future__ import annotations

import sys

import click

from shared.cache import CacheError
from train.checkpoints import CheckpointError
from train.config import ARCHS, ConfigError, field_help, get_default_cfg, load_toml, parse_set, update_cfg

USER_ERRORS = (CacheError, ConfigError, CheckpointError)


def _user_errors(fn, *args, **kwargs):
    from train.training import TrainingError

    try:
        return fn(*args, **kwargs)
    except (*USER_ERRORS, TrainingError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _count(text: str | None):
    if text is None:
        return None
    from harvest.cli import COUNT

    return COUNT.convert(text, None, None)


HELP = field_help()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train sparse autoencoders on a harvested activation cache."""


@main.command()
@click.option("--store", help=HELP["store"])
@click.option("--site", help=HELP["site"])
@click.option("--arch", type=click.Choice(ARCHS), help=HELP["arch"] + " [default: topk]")
@click.option("--k", type=int, help=HELP["k"] + " [default: 32]")
@click.option("--dict-size", type=int, help=HELP["dict_size"])
@click.option("--expansion", type=int, help=HELP["expansion"] + " [default: 8]")
@click.option("--lr", type=float, help=HELP["lr"] + " [default: 4e-4]")
@click.option("--batch-size", type=int, help=HELP["batch_size"] + " [default: 4096]")
@click.option("--tokens", help=HELP["tokens"] + " Accepts 50M, 1e6. [default: 10M]")
@click.option("--seed", type=int, help=HELP["seed"] + " [default: 0]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of config keys (flat, or under [train]).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key; repeatable (see `train config`).")
@click.option("--out", help=HELP["out"] + " [default: runs]")
@click.option("--checkpoint-every", help=HELP["checkpoint_every"] + " Accepts 5M.")
@click.option("--wandb-mode", type=click.Choice(["online", "offline", "disabled"]), help=HELP["wandb_mode"])
@click.option("--quiet", is_flag=True, help="No progress bar.")
def run(config_file, sets, quiet, **options) -> None:
    """Train one SAE. Precedence: defaults < --config file < options < --set.

    The last line printed is the run's checkpoint folder.
    """
    from train.training import train_sae

    def build():
        cfg = get_default_cfg()
        if config_file:
            cfg = update_cfg(cfg, **load_toml(config_file))
        given = {k: v for k, v in options.items() if v is not None}
        for key in ("tokens", "checkpoint_every"):
            if key in given:
                given[key] = _count(given[key])
        cfg = update_cfg(cfg, **given)
        return update_cfg(cfg, **parse_set(list(sets)))

    cfg = _user_errors(build)
    sae, run_dir = _user_errors(train_sae, None, cfg, progress=not quiet)
    _print_results(run_dir)
    click.echo(str(run_dir))


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--tokens", help="Raise the run's token budget (e.g. 20M).")
@click.option("--wandb-mode", type=click.Choice(["online", "offline", "disabled"]))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def resume(checkpoint, tokens, wandb_mode, quiet) -> None:
    """Resume a run folder (or one of its checkpoint folders) from its newest good checkpoint.

    The run finishes exactly as it would have without the interruption.
    """
    from train.training import load_run_config, resume_training

    def build():
        from train.checkpoints import latest_checkpoint

        run_dir = latest_checkpoint(checkpoint)[0]
        cfg = load_run_config(run_dir)
        changes = {"tokens": _count(tokens), "wandb_mode": wandb_mode}
        return update_cfg(cfg, **{k: v for k, v in changes.items() if v is not None})

    cfg = _user_errors(build)
    sae, run_dir = _user_errors(resume_training, None, cfg, checkpoint, progress=not quiet)
    _print_results(run_dir)
    click.echo(str(run_dir))


@main.command("config")
def show_config() -> None:
    """List every config key with its default and meaning."""
    cfg = get_default_cfg().to_dict()
    for key, text in HELP.items():
        click.echo(f"{key:24s} {cfg[key]!r:>14}  {text}")


def _print_results(run_dir) -> None:
    import json
    from pathlib import Path

    done = Path(run_dir) / "done.json"
    if not done.exists():
        return
    res = json.loads(done.read_text()).get("results", {})
    held = res.get("heldout")
    if held:
        line = (f"held-out: explained variance {held['explained_variance']:.4f}, mse {held['mse']:.4g}, "
                f"L0 {held['l0']:.2f}, never fired {held['never_fired_fraction']:.2%}")
        if "inference_l0" in res:
            line += f" (inference with {res['threshold_kind']} threshold; k = {res['k']})"
        click.echo(line, err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
