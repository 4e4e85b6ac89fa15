"""One autocast vocabulary (shared.autocast) for harvest, train and eval: none | bf16 | auto, with
the older spelling bfloat16 accepted for bf16, and each command's choices unchanged in meaning."""

from types import SimpleNamespace

import click
import pytest
import torch
from click.testing import CliRunner

from shared.autocast import AUTOCAST, AutocastError, autocast_dtype, canonical_autocast
from shared.cli_common import AUTOCAST_TYPE
from shared.errors import UserError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device name only: no CUDA is needed


def test_the_vocabulary_and_its_alias():
    assert AUTOCAST == ("none", "bf16", "auto")
    assert [canonical_autocast(c) for c in ("none", "bf16", "auto", "bfloat16")] == ["none", "bf16", "auto", "bf16"]
    with pytest.raises(AutocastError, match=r"^autocast='fp16' is not one of none, bf16, auto$"):
        canonical_autocast("fp16")
    assert issubclass(AutocastError, UserError)
    assert autocast_dtype("auto", torch.float16) is torch.float16  # auto is the caller's
    assert autocast_dtype("none", torch.bfloat16) is None and autocast_dtype("bf16", None) is torch.bfloat16


# what each command computed before the shared vocabulary (its choices -> dtype)
HARVEST_BEFORE = {("auto", CPU): None, ("auto", CUDA): torch.bfloat16, ("bfloat16", CPU): torch.bfloat16,
                  ("bfloat16", CUDA): torch.bfloat16, ("none", CPU): None, ("none", CUDA): None}
EVAL_BEFORE = {("none", "bfloat16", CUDA): None, ("bfloat16", "float32", CPU): torch.bfloat16,
               ("auto", "bfloat16", CUDA): torch.bfloat16, ("auto", "float32", CUDA): None,
               ("auto", "bfloat16", CPU): None, ("auto", None, CUDA): None}


@pytest.mark.parametrize("choice,device", sorted(HARVEST_BEFORE, key=str))
def test_harvest_computes_as_before(choice, device):
    from harvest.runner import autocast_dtype as harvest_dtype

    want = HARVEST_BEFORE[(choice, device)]
    assert harvest_dtype(SimpleNamespace(autocast=choice), device) is want
    if choice == "bfloat16":
        assert harvest_dtype(SimpleNamespace(autocast="bf16"), device) is want


@pytest.mark.parametrize("choice,compute,device", sorted(EVAL_BEFORE, key=str))
def test_eval_computes_as_before(choice, compute, device):
    from train.lm_figures import autocast_dtype as eval_dtype

    want = EVAL_BEFORE[(choice, compute, device)]
    assert eval_dtype(choice, compute, device) is want
    if choice == "bfloat16":
        assert eval_dtype("bf16", compute, device) is want


def test_the_click_type_reads_the_alias_and_lists_the_vocabulary():
    assert [AUTOCAST_TYPE.convert(c, None, None) for c in ("none", "bf16", "auto", "bfloat16")] == \
        ["none", "bf16", "auto", "bf16"]
    with pytest.raises(click.BadParameter, match="'fp16' is not one of 'none', 'bf16', 'auto'"):
        AUTOCAST_TYPE.convert("fp16", None, None)


@pytest.mark.parametrize("command", ["harvest run", "train eval"])
def test_harvest_and_eval_offer_the_same_choices(command):
    from harvest.cli import main as harvest_cli
    from train.cli import main as train_cli

    group = harvest_cli if command.startswith("harvest") else train_cli
    out = CliRunner().invoke(group, [command.split()[1], "--help"], terminal_width=200).output
    assert "--autocast [none|bf16|auto]" in out, out


# --------------------------------------------------------------------------- what auto chose is recorded


@pytest.mark.parametrize("choice,want", [("auto", "float32"), ("bf16", "bfloat16"), ("none", "float32")])
def test_a_harvest_records_the_compute_dtype_its_autocast_chose(tiny_llama_dir, tiny_corpus, tmp_path, choice, want):
    """The cache spec records the dtype the LM computed in (auto: float32 on the CPU), so that eval's
    auto and `harvest repair` can follow it."""
    from harvest.runner import run_harvest
    from shared.cache import Cache
    from tests.helpers import HARVEST_CTX, harvest_config

    out = tmp_path / "cache"
    run_harvest(harvest_config(tiny_llama_dir, tiny_corpus["jsonl"], out, autocast=choice, tokens=HARVEST_CTX * 4),
                progress=False)
    assert Cache.open(out).spec.model["compute_dtype"] == want

