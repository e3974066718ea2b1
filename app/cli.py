"""The ``pipeline`` command. Each stage's command is built from its registered declaration
(stages/): the options are the fields of its Config, with their defaults and help; the command
builds the Config, calls ``run`` and prints the stage's summary.

Problems the user can fix print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import click

import stages
from app import study
from cache import jsonfile
from cache.errors import UserError
from pipeline.configs import CONFIG_DEFAULT, Field, Stage, fields
from pipeline.threads import quiet_openmp

log = logging.getLogger("pipeline")

# command name -> where its declaration lives; stage modules are imported only when their command runs
COMMANDS = {**{("import" if n == "import" else n): f"stages:{n}" for n in stages.NAMES},
            "concept-addition": "app.concept", "grid": "app.grid"}


class _Group(click.Group):
    """Builds a stage's command on first use; turns UserError into one line and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        quiet_openmp()  # before a stage module imports torch, whose OpenMP reads it once
        return super().main(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*COMMANDS, *super().list_commands(ctx)])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS:
            return stage_command(_declaration(name))
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


class _Say(logging.Handler):
    """Log lines written above any progress bar, as plain sentences (a command's plan and estimates
    as they are, problems as ``warning: ...``); with --verbose, with level and logger names."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        text = record.getMessage()
        if self.verbose:
            text = f"{record.levelname} {record.name}: {text}"
        elif record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        tqdm.write(text, file=sys.stderr)


def _declaration(command: str) -> Stage:
    where = COMMANDS[command]
    if where.startswith("stages:"):
        return stages.load(where.split(":", 1)[1])
    import importlib

    return importlib.import_module(where).STAGE


# ---------------------------------------------------------------------------------------
# Options from Config fields


def _flag(field: Field) -> str:
    if field.option.name:
        return field.option.name
    name = field.name.removesuffix("_dir").removesuffix("_path")
    if field.kind is bool and field.default is True:
        name = f"no_{name}"
    return "--" + name.replace("_", "-")


def _inner(kind: Any) -> Any:
    """``X`` of ``X | None``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _parser(kind: Any, flag: str):
    """click's type and a callback turning the typed text into the field's value."""
    origin = typing.get_origin(kind)
    if kind is Path:
        return click.Path(path_type=Path), None
    if origin is Literal:
        return click.Choice([str(v) for v in typing.get_args(kind)]), None
    if kind in (int, float, str):
        return kind, None
    if origin is tuple:
        item = typing.get_args(kind)[0]
        if typing.get_origin(item) is tuple:  # (attribute, value) pairs, given as ATTR=VALUE and parsed by the Config
            return str, None
        def parse(ctx, param, value):
            items = _split(value)
            if items is None:
                return None
            if item is int:
                try:
                    return tuple(int(v) for v in items)
                except ValueError:
                    raise click.BadParameter(f"expected comma-separated integers such as 6,10,11, got '{value}'") \
                        from None
            return tuple(int(v) if item != str and v.lstrip("-").isdigit() else v for v in items)
        return str, parse
    if kind in (typing.Mapping, dict) or origin in (dict, typing.Mapping, Mapping):
        return str, lambda ctx, param, value: None if value is None else _record(value)
    raise TypeError(f"{flag}: no command-line form for {kind!r}")


def _record(value: str) -> dict[str, object]:
    """A JSON file holding an object, or key=value pairs such as seed=0,image_size=32."""
    if Path(value).is_file():
        try:
            record = json.loads(Path(value).read_text())
        except json.JSONDecodeError as err:
            raise click.BadParameter(f"{value} is not JSON ({err})") from None
        if not isinstance(record, dict):
            raise click.BadParameter(f"{value} must hold a JSON object such as {{\"seed\": 0, \"image_size\": 32}}")
        return record
    record = {}
    for item in value.split(","):
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise click.BadParameter(f"expected key=value pairs such as seed=0,image_size=32, or a JSON file; "
                                     f"got '{item}'")
        record[key] = int(text) if text.lstrip("-").isdigit() else text
    return record


def _shown(default: Any) -> Any:
    if isinstance(default, tuple):
        return ",".join("=".join(map(str, d)) if isinstance(d, tuple) else str(d) for d in default)
    return default


def _param(field: Field) -> click.Parameter:
    flag = _flag(field)
    default = field.default if field.option.default is CONFIG_DEFAULT else field.option.default
    if not flag.startswith("-"):
        click_type, callback = _parser(_inner(field.kind), flag)
        return click.Argument([field.name], type=click_type, callback=callback, metavar=flag)
    decls = [flag, field.name]
    help_text = field.help
    if field.kind is bool:
        if field.default is True and not field.option.name:
            help_text = f"do not {help_text}"
        return click.Option(decls, is_flag=True, flag_value=not field.default, default=field.default, help=help_text)
    kind = _inner(field.kind)
    click_type, callback = _parser(kind, flag)
    multiple = typing.get_origin(kind) is tuple and typing.get_origin(typing.get_args(kind)[0]) is tuple
    if field.required:
        return click.Option(decls, type=click_type, callback=callback, required=True, help=help_text)
    if multiple:
        default = tuple("=".join(pair) if isinstance(pair, tuple) else pair for pair in default)
        return click.Option(decls, type=click_type, multiple=True, default=default, metavar="ATTR=VALUE",
                            show_default=bool(default) and _shown(default), help=help_text + " (repeatable)")
    optional_text = field.kind is not kind and default is not None
    if optional_text and "'none'" not in help_text:
        help_text += " ('none': unset)"
    shown = _shown(default)
    return click.Option(decls, type=click_type, callback=_none_text(callback) if optional_text else callback,
                        default=shown, show_default=shown is not None, help=help_text)


def _none_text(callback):
    """An optional field with a default: the text 'none' sets it to None."""
    def parse(ctx, param, value):
        if isinstance(value, (str, Path)) and str(value).lower() == "none":
            return None
        return callback(ctx, param, value) if callback else value
    return parse


def stage_command(stage: Stage) -> click.Command:
    """The command of a stage: parse its Config's fields, run it, print its summary."""
    params = [_param(f) for f in fields(stage.config) if not f.option.hidden]

    def callback(**values: Any) -> None:
        out = stage.run(stage.config(**values))
        click.echo(stage.summary(out))

    return click.Command(stage.command or stage.name, params=params, callback=callback, help=stage.help,
                         context_settings={"max_content_width": 100})


# ---------------------------------------------------------------------------------------
# The group and the commands that are not stages


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """PatchSAE pipeline: CLIP ViT activations -> Zarr cache -> sparse autoencoders -> concepts.

    Layers are block indices, 0-based, residual-stream output of that block. `dvc repro` runs
    the whole study (dvc.yaml, params.yaml); each command below runs one stage by hand.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[_Say(verbose)])
    for ours in ("app", "pipeline", "stages", "cache"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # the progress bar shows training metrics; per-interval log lines only with -v
        logging.getLogger("pipeline.sae.trainer").setLevel(logging.WARNING)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(store: Path, as_json: bool) -> None:
    """Describe what a store holds: model, layers, shapes, completeness, size, token norms."""
    from cache.check import describe, describe_lines

    d = describe(store)
    click.echo(jsonfile.dumps(d) if as_json else "\n".join(describe_lines(d)))


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
def verify(store: Path) -> None:
    """Check every shard of an activation or code store; exit 1 if anything is wrong."""
    from cache.check import verify as check

    report = check(store)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
def repair(store: Path) -> None:
    """Recompute exactly the damaged shards of an activation or code store (what `verify` reports).

    Reruns the command that created the store (recorded in it), which resumes and rewrites
    only those shards; exit 1 if the store is still not OK afterwards.
    """
    from app.repair import run

    lines = run(store)
    for line in lines:
        click.echo(line)
    if lines[-1] == "FAILED":
        sys.exit(1)


@main.command()
@click.option("--dataset", help="Which of data.datasets (default: the first).")
@click.option("--layer", type=int, help="Which of extract.layers (default: the last).")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
@click.option("--readme", type=click.Path(path_type=Path), help="Also write the findings into this file, between "
              "its findings markers (`make figures` does this for README.md).")
def findings(dataset: str | None, layer: int | None, params_path: Path, readme: Path | None) -> None:
    """Say what the finished study found for one dataset and block, and where to look next."""
    from app import findings as f
    from app.params import load_params

    params = load_params(params_path)
    default_dataset, default_layer = f.default_instance(params)
    dataset, layer = dataset or default_dataset, default_layer if layer is None else layer
    text = "\n".join(f.lines(f.collect(study.WORK, dataset, layer), dataset, layer, f.layer_unit(params)))
    click.echo(text)
    run = study.resolve(study.RUN, study.WORK, dataset, layer)
    across = study.resolve(study.STEP["summary"].paths["out_dir"], study.WORK, None, None) / "index.html"
    click.echo(f"\nReport: {run / 'report' / 'index.html'}   Across datasets: {across}   "
               "Numbers: dvc metrics show --md   Plots: dvc plots show")
    if readme is not None:
        f.write_into(readme, text)
        click.echo(f"wrote these findings into {readme}")


@main.command("show-latent")
@click.option("--stats", "stats_dir", required=True, type=click.Path(path_type=Path), help="Folder from pipeline stats.")
@click.option("--latent", required=True, type=int, help="Latent id.")
def show_latent(stats_dir: Path, latent: int) -> None:
    """Print one latent's statistics and reference images."""
    from pipeline.latents import LatentStats

    for line in LatentStats(stats_dir).describe(latent):
        click.echo(line)


@main.command("export-sae")
@click.argument("sae_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["saelens"]), default="saelens", show_default=True,
              help="Format to write.")
@click.argument("out", type=click.Path(path_type=Path))
def export_sae(sae_dir: Path, fmt: str, out: Path) -> None:
    """Write the SAE checkpoint SAE_DIR as a SAELens folder OUT (cfg.json + sae_weights.safetensors).

    Its layer L becomes hook blocks.L.hook_resid_post; norm_scale is folded into the weights, so
    SAELens encodes raw activations to the same codes.
    """
    from pipeline.sae.interop import export_sae as export

    click.echo(f"wrote {export(sae_dir, out, fmt=fmt)}")


@main.command("import-sae")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["saelens", "patchsae"]), required=True,
              help="saelens: a folder from sae.save_model; patchsae: a .pt file of dynamical-inference/patchsae.")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layer", type=int, help="The block you expect (0-based, residual output); refused if the file "
              "says another. Needed when the file does not say.")
@click.option("--model", help="The model as name/pretrained (e.g. ViT-B-16/openai), when the file does not say it so.")
@click.option("--k", type=int, help="Training budget of a one-threshold jumprelu SAE (imported as batchtopk).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path),
              help="Activation store to check width, layer and model against (and record as provenance).")
def import_sae(source: Path, fmt: str, out: Path, layer: int | None, model: str | None, k: int | None,
               cache_dir: Path | None) -> None:
    """Read SOURCE (a SAELens folder or a PatchSAE checkpoint) and save it as this pipeline's SAE folder OUT."""
    from pipeline.sae.interop import import_sae as load

    click.echo(f"wrote {load(source, out, fmt=fmt, layer=layer, model=model, k=k, cache_dir=cache_dir)}")


@main.command("run-stage")
@click.argument("name", type=click.Choice([step.name for step in study.STEPS]))
@click.option("--dataset", help="Which of data.datasets (every stage but pretrain).")
@click.option("--layer", type=int, help="Which of extract.layers (the stages that read an SAE).")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
def run_stage(name: str, dataset: str | None, layer: int | None, params_path: Path) -> None:
    """Run one stage instance of dvc.yaml with its settings from params.yaml (what `dvc repro` calls).

    Outputs go under work/ (layout: app/study.py).
    """
    from app.params import load_params

    click.echo(study.run_stage(name, load_params(params_path), dataset, layer))


@main.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(path_type=Path),
              help="The study to plan (e.g. a preset).")
@click.option("--l0", type=float, help="Expected active latents per token of a relu SAE, for the code stores' size "
              "(default: the upper bound d_sae).")
@click.option("--no-calibrate", is_flag=True, help="Sizes only: skip the few-second timing on this machine.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def plan(params_path: Path, l0: float | None, no_calibrate: bool, as_json: bool) -> None:
    """Estimate a study's cost before running it: per stage instance, images, tokens, disk, the peak
    memory of an SAE training step and time (from a short calibration on this machine), plus DVC's
    cache copy and hashing time."""
    from app import plan as p

    made = p.make(params_path, calibrated=not no_calibrate, l0=l0)
    click.echo(jsonfile.dumps(p.to_json(made)) if as_json else "\n".join(p.lines(made)))


@main.command("dvc-yaml")
@click.option("--check", is_flag=True, help="Only compare: exit 1 when dvc.yaml differs from the study.")
@click.option("--out", "out_path", default="dvc.yaml", show_default=True, type=click.Path(path_type=Path))
def dvc_yaml(check: bool, out_path: Path) -> None:
    """Write dvc.yaml from the study (app/study.py) and each stage's declared inputs, outputs and code."""
    from app.dvcfile import render

    text = render()
    if check:
        same = out_path.is_file() and out_path.read_text() == text
        click.echo(f"{out_path} is {'up to date' if same else 'out of date: run `pipeline dvc-yaml`'}")
        sys.exit(0 if same else 1)
    out_path.write_text(text)
    click.echo(f"wrote {out_path}")


if __name__ == "__main__":
    main()
