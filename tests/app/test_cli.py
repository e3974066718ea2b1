"""The `pipeline` command is built from the stage declarations: every option of the hand-written
CLI it replaced is still there, with help, and values parse into the Config as before."""

from __future__ import annotations

import click
import pytest

from app.cli import COMMANDS, _declaration, main, stage_command
from pipeline.configs import CONFIG_DEFAULT, fields

# every option of each command before the CLI was derived from the Configs (--cluster local became
# --scheduler local)
BEFORE = {
    "extract": "--dataset --root --split --limit --model --pretrained --layers --out --batch-size --device --dtype "
               "--workers --overwrite --seed --chunk-images --shard-images --scheduler --n-workers --adapter "
               "--no-progress --task --allow-held-out --threads",
    "train": "--cache --layer --out --arch --expansion --k --l1 --token-kind --tokens --batch-images --lr "
             "--warmup-steps --normalize --revival --dead-window-tokens --val-fraction --early-stop-patience "
             "--checkpoint-every --log-every --seed --device --dtype --overwrite --no-progress --threads",
    "encode": "--cache --sae --out --batch-tokens --device --overwrite --no-progress --threads",
    "stats": "--codes --cache --out --top-k --threshold --scheduler --workers --no-plots --threads",
    "report": "--stats --out --latents --low-entropy --min-references --root --groundtruth",
    "groundtruth": "--stats --out --world --codes --cache --attributes --score --auroc-threshold --map-threshold "
                   "--object-fraction --no-plots --threads",
    "mask": "--sae --stats --out --cache --adapter --dataset --root --split --limit --seed --model --pretrained "
            "--layer --mode --k --error-term --seeds --random-seed --head --templates --class-prompts "
            "--classifier-cache --probe-split --probe-images --batch-size --device --dtype --workers "
            "--full-last-block --no-plots --no-progress --threads",
    "remap": "--base --adapted --out --high --low --normalise --base-masking --adapted-masking --no-plots",
    "concept-addition": "--out --params --held-out --task --control --layer",
    "import": "--out --shape --dtype --key --labels --class-names --prefix-tokens --layer --model --overwrite",
    "pretrain": "--world --out --model --steps --batch-size --lr --warmup-steps --positives --weight-decay --precision "
                "--seed --held-out --task --templates --eval-images --workers --overwrite --no-progress --threads "
                "--device --checkpoint-every",
    "adapt": "--dataset --root --out --model --pretrained --shots --seed --train-split --test-split --test-limit "
             "--n-ctx --depth --ctx-init --class-prompts --epochs --batch-size --lr --warmup-epochs --warmup-lr "
             "--weights --templates --eval-batch-size --workers --overwrite --no-progress --threads --device "
             "--checkpoint-every --task --allow-held-out",
}


def _command(name: str) -> click.Command:
    return stage_command(_declaration(name))


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_earlier_option_is_still_there_with_help(name):
    options = {opt: p for p in _command(name).params for opt in p.opts}
    missing = set(BEFORE[name].split()) - set(options)
    assert not missing, f"pipeline {name} lost {sorted(missing)}"
    for p in _command(name).params:
        if isinstance(p, click.Option):
            assert p.help and len(p.help) > 8, f"{name} {p.opts} has no help"


def test_every_registered_stage_has_a_command():
    assert set(BEFORE) <= set(COMMANDS)


def _config_from(name: str, args: list[str]):
    """The Config the command would build from ``args`` (without running the stage)."""
    command = _command(name)
    ctx = command.make_context(name, args)
    return _declaration(name).config(**ctx.params)


def test_values_parse_into_the_config(tmp_path):
    cfg = _config_from("extract", ["--dataset", "synthetic", "--out", str(tmp_path), "--layers", "6,10,11",
                                   "--task", "colour", "--no-progress", "--chunk-images", "8"])
    assert cfg.layers == (6, 10, 11) and cfg.synthetic_task == "colour" and cfg.progress is False
    assert cfg.images_per_chunk == 8 and cfg.out_dir == tmp_path and cfg.model == "ViT-B-16"
    mask = _config_from("mask", ["--sae", "s", "--stats", "t", "--out", str(tmp_path), "--cache", "c", "--k", "1,10,all",
                                 "--mode", "off", "--full-last-block", "--classifier-cache", "none"])
    assert mask.ks == (1, 10, "all") and mask.modes == ("off",) and mask.class_token_only is False
    assert mask.classifier_cache_dir is None
    pre = _config_from("pretrain", ["--out", str(tmp_path), "--held-out", "texture=checker", "--held-out",
                                    "background=grey"])
    assert set(pre.held_out) == {("texture", "checker"), ("background", "grey")}
    adapt = _config_from("adapt", ["--dataset", "synthetic", "--out", str(tmp_path), "--ctx-init", "none"])
    assert adapt.ctx_init is None
    gt = _config_from("groundtruth", ["--stats", "s", "--out", str(tmp_path), "--world", "seed=3,task=shape"])
    assert dict(gt.world) == {"seed": 3, "task": "shape"}


REQUIRED = {"extract": "--dataset synthetic --out o", "train": "--cache c --layer 0 --out o",
            "encode": "--cache c --sae s --out o", "stats": "--codes c --cache a --out o", "report": "--stats s --out o",
            "groundtruth": "--stats s --out o", "mask": "--sae s --stats t --out o --cache c",
            "remap": "--base b --adapted a --out o", "import": "a.npy --out o", "pretrain": "--out o",
            "adapt": "--dataset synthetic --out o", "concept-addition": "--out o"}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_defaults_and_help_come_from_the_config(name):
    """With only the required options, the command builds the Config's own defaults (the CLI
    differs only where its declaration says so) and shows each field's help."""
    cfg = _config_from(name, REQUIRED[name].split())
    config = type(cfg)
    options = {p.name: p for p in _command(name).params}
    given = {p.name for p in options.values() if set(p.opts) & set(REQUIRED[name].split())}
    plain = config(**{f.name: getattr(cfg, f.name) for f in fields(config) if f.required or f.name in given})
    for field in fields(config):
        if field.required:
            continue
        expected = getattr(plain, field.name) if field.option.default is CONFIG_DEFAULT else field.option.default
        assert getattr(cfg, field.name) == expected, field.name
        if field.kind is not bool:
            assert field.help in options[field.name].help


def test_a_bad_value_is_one_line(tmp_path):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["extract", "--dataset", "synthetic", "--out", str(tmp_path / "s"),
                                       "--layers", "a,b"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
