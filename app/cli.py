"""The ``pipeline`` command: parses options, builds a stage config, calls ``run``, reports.

Problems the user can fix print one line ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import click

from cache.errors import UserError

log = logging.getLogger("pipeline")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated block indices such as 6,10,11, got '{value}'") from None


class _Group(click.Group):
    """Turns UserError into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


def _world_options(command: Callable) -> Callable:
    """--task and --allow-held-out: the synthetic world's classes (extract, adapt)."""
    command = click.option("--allow-held-out", is_flag=True,
                           help="Synthetic dataset only: allow values the model's pretraining held out (its "
                                "config.json says which), e.g. for a concept-addition test.")(command)
    return click.option("--task", "synthetic_task", default="shape_colour", show_default=True,
                        help="Synthetic dataset only: which attributes make the classes (shape_colour, shape, "
                             "colour, size, texture, background).")(command)


def _training_options(command: Callable) -> Callable:
    """--checkpoint-every, --device and --threads of the resumable training commands (pretrain, adapt)."""
    command = click.option("--threads", type=int, default=None,
                           help="torch CPU threads (default: torch's own setting).")(command)
    command = click.option("--device", default="auto", show_default=True,
                           help="cpu, cuda, cuda:N, or auto (GPU when present).")(command)
    return click.option("--checkpoint-every", default=50, show_default=True,
                        help="Steps between checkpoints.")(command)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """PatchSAE pipeline: CLIP ViT activations -> Zarr cache -> sparse autoencoders -> concepts.

    Layers are block indices, 0-based, residual-stream output of that block.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for ours in ("pipeline", "stages", "cache"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # the progress bar shows training metrics; per-interval log lines only with -v
        logging.getLogger("pipeline.sae.trainer").setLevel(logging.WARNING)


@main.command()
@click.option("--dataset", required=True, help="synthetic, imagefolder, eurosat, imagenet, caltech101, oxfordpets, "
              "stanfordcars, flowers102, food101, fgvcaircraft, sun397, dtd, ucf101.")
@click.option("--root", type=click.Path(path_type=Path), help="Local dataset folder (nothing is downloaded).")
@click.option("--split", help="Dataset split; default depends on the dataset (e.g. 'all' for folders, 'test').")
@click.option("--limit", type=int, help="Keep this many images: a seeded random subset, in dataset order. "
              "For synthetic: the number of generated images (default 1000).")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip model name, or tiny-vit.")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip pretrained tag, a local checkpoint file, or 'none' for random weights.")
@click.option("--layers", default="10", show_default=True, callback=lambda c, p, v: _int_list(v),
              help="Comma-separated block indices to store, e.g. 6,10,11. The forward stops after the last.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Store directory to create or resume.")
@click.option("--batch-size", default=32, show_default=True, help="Images per forward.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto (GPU when present).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Model compute precision; the store is always float16.")
@click.option("--workers", default=0, show_default=True, help="Image-decoding processes (0 = main process).")
@click.option("--overwrite", is_flag=True, help="Replace a store that was written with another config.")
@click.option("--seed", default=0, show_default=True, help="Seed of --limit's subset and of the synthetic images.")
@click.option("--chunk-images", "images_per_chunk", type=int, help="Rows per Zarr chunk (default: ~3 MB chunks).")
@click.option("--shard-images", "images_per_shard", type=int, help="Rows per shard file (default: ~64 MB shards).")
@click.option("--scheduler", help="Run one Dask task per shard on this scheduler (tcp://HOST:PORT); "
              "its workers must see --out on a shared file system.")
@click.option("--cluster", type=click.Choice(["local"]), help="Start a local Dask cluster (see --n-workers).")
@click.option("--n-workers", default=2, show_default=True, help="Worker processes of --cluster local.")
@click.option("--adapter", type=click.Path(path_type=Path),
              help="MaPLe adapter folder (pipeline adapt --out): store the adapted model's activations "
                   "(the base model's token positions; the vision prompt tokens are dropped).")
@_world_options
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def extract(no_progress: bool, cluster: str | None, scheduler: str | None, **options: object) -> None:
    """Stream patch-token activations of chosen blocks into a resumable Zarr store.

    Rerunning the same command finishes an interrupted store; a different config is refused
    unless --overwrite. Unreadable images are skipped, counted and listed in the store.
    """
    from stages import extract as stage

    if cluster and scheduler:
        raise UserError("give either --cluster local or --scheduler ADDRESS, not both")
    out = stage.run(stage.Config(progress=not no_progress, scheduler=scheduler or cluster, **options))
    click.echo(
        f"extracted {out.n_computed} of {out.n_images} images ({out.n_skipped} unreadable, skipped) "
        f"x {out.n_tokens // max(out.n_images, 1)} tokens, layers {list(out.layers)}: "
        f"{_human_bytes(out.bytes_written)} in {out.seconds:.1f} s "
        f"({out.n_computed / max(out.seconds, 1e-9):.1f} images/s) -> {out.store_dir}")
    for layer, stats in out.norms.items():
        if "class" in stats:
            click.echo(f"  layer {layer} token norms: class mean {stats['class']['mean']:.2f}, "
                       f"patches mean {stats['patches']['mean']:.2f} (max {stats['patches']['max']:.2f})")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(store: Path, as_json: bool) -> None:
    """Describe what a store holds: model, layers, shapes, completeness, size, token norms."""
    from cache.check import describe

    d = describe(store)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    m = d["model"]
    click.echo(f"store        {d['path']}  (format {d['format_version']}, config {d['config_sha256'][:12]})")
    click.echo(f"model        {m['name']} / {m['pretrained']}  ({m['n_blocks']} blocks, width {m['d_model']}, {m['dtype']})")
    ds = d["dataset"]
    click.echo(f"dataset      {ds['name']} split={ds['split']} root={ds['root']}  ({d['n_classes']} classes)")
    click.echo(f"layers       {d['layers']}  ({m['layer_convention']})")
    click.echo(f"shape NTD    {d['shape_NTD']} {d['dtype']}; chunks of {d['chunk_images']} images, shards of {d['shard_images']}")
    t = d["token_layout"]
    click.echo(f"tokens       class token at {t['class_token_index']}, patch grid {t['patch_grid']} ({t['patch_order']})")
    click.echo(f"complete     {d['shards_complete']} shards; invalid rows: {d['invalid_rows']}")
    click.echo(f"size         {_human_bytes(d['size_bytes'])}")
    for layer, s in d["token_norms"].items():
        if "class" not in s:
            continue
        click.echo(f"layer {layer} norms ({s['n_images_sampled']} images sampled):")
        for kind in ("class", "patches"):
            k = s[kind]
            click.echo(f"  {kind:8s} mean {k['mean']:8.2f}  median {k['median']:8.2f}  p99 {k['p99']:8.2f}  max {k['max']:8.2f}")
        dims = ", ".join(f"{o['dim']} ({o['mean_abs_over_median']:.1f}x)" for o in s["outlier_dims"])
        click.echo(f"  largest patch dims by mean |x| (x median dim): {dims}")


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
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Activation store to train on.")
@click.option("--layer", required=True, type=int, help="Block index inside the store (0-based, residual output).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="SAE folder to create or resume.")
@click.option("--arch", default="relu", show_default=True, type=click.Choice(["relu", "topk", "batchtopk"]),
              help="relu = the paper's ReLU + L1; topk/batchtopk keep k latents per token.")
@click.option("--expansion", default=64.0, show_default=True, help="Latents per model dimension (paper: 64).")
@click.option("--k", type=int, help="Active latents per token (topk, batchtopk).")
@click.option("--l1", type=float, help="L1 coefficient (default: 8e-5 for relu, as in the paper).")
@click.option("--token-kind", default="all", show_default=True, type=click.Choice(["all", "patches", "cls"]))
@click.option("--tokens", "total_tokens", default=2_000_000, show_default=True, help="Total token budget.")
@click.option("--batch-images", default=128, show_default=True, help="Images' worth of tokens per step.")
@click.option("--lr", default=4e-4, show_default=True)
@click.option("--warmup-steps", default=500, show_default=True)
@click.option("--normalize", is_flag=True, help="Scale activations to unit mean norm x sqrt(D) (stored with the SAE).")
@click.option("--revival", default="auto", show_default=True,
              type=click.Choice(["auto", "ghost_grads", "auxk", "none"]), help="Dead-latent revival.")
@click.option("--dead-window-tokens", default=1_000_000, show_default=True,
              help="A latent silent for this many tokens counts as dead.")
@click.option("--val-fraction", default=0.05, show_default=True, help="Images held out for validation.")
@click.option("--early-stop-patience", type=int, help="Stop after this many logs without validation FVU gain.")
@click.option("--checkpoint-every", default=500, show_default=True, help="Steps between checkpoints.")
@click.option("--log-every", default=50, show_default=True, help="Steps between metric records.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]))
@click.option("--overwrite", is_flag=True, help="Replace an SAE folder trained with other settings.")
@click.option("--no-progress", is_flag=True)
def train(no_progress: bool, **options: object) -> None:
    """Train a sparse autoencoder on one layer of a store; rerun the same command to resume."""
    from stages import train as stage

    out = stage.run(stage.Config(progress=not no_progress, **options))
    m = out.metrics
    resumed = f" (resumed at step {out.resumed_from_step})" if out.resumed_from_step else ""
    click.echo(f"trained {out.steps} steps{resumed} in {out.seconds:.1f} s -> {out.sae_dir}")
    click.echo(f"  {m['eval_split']} metrics: MSE {m['mse']:.4g}  FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  "
               f"L1 {m['l1']:.3g}  dead {m['train_dead_fraction']:.3f}  ({out.metrics_path}, {out.plot_path})")


@main.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path), help="Activation store.")
@click.option("--sae", "sae_dir", required=True, type=click.Path(path_type=Path), help="Trained SAE folder.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Code store to create or resume.")
@click.option("--batch-tokens", type=int, help="Tokens per SAE forward (default: ~256 MB of dense codes).")
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a code store made from another SAE or store.")
@click.option("--no-progress", is_flag=True)
def encode(no_progress: bool, **options: object) -> None:
    """Write every token's sparse SAE code (CSR per shard, zstd); rerun to resume."""
    from stages import encode as stage

    out = stage.run(stage.Config(progress=not no_progress, **options))
    click.echo(f"encoded {out.n_images} images ({out.n_tokens} tokens, mean L0 {out.mean_l0:.1f}) "
               f"in {out.seconds:.1f} s -> {out.codes_dir}")


@main.command()
@click.option("--codes", "codes_dir", required=True, type=click.Path(path_type=Path), help="Code store (pipeline encode).")
@click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path),
              help="Activation store the codes were encoded from.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Statistics folder to write.")
@click.option("--top-k", default=10, show_default=True, help="Reference images kept per latent.")
@click.option("--threshold", default=0.2, show_default=True, help="Class counts count tokens with f > threshold.")
@click.option("--scheduler", default="threads", show_default=True,
              help="Dask scheduler: threads, synchronous, processes, or a dask.distributed address tcp://host:port.")
@click.option("--workers", "n_workers", type=int, help="Threads or processes of a local scheduler (default: cores).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
def stats(no_plots: bool, **options: object) -> None:
    """Per-latent statistics (frequency, mean activation, references, label entropy, class counts).

    Out of core: one Dask task per code shard, partial results merged in a tree.
    """
    from stages import stats as stage

    out = stage.run(stage.Config(plots=not no_plots, **options))
    click.echo(f"statistics of {out.n_latents} latents ({out.n_dead} dead) over {out.n_valid_images} valid images "
               f"in {out.n_shards} shards, {out.seconds:.1f} s -> {out.stats_dir}")


@main.command()
@click.option("--stats", "stats_dir", required=True, type=click.Path(path_type=Path), help="Folder from pipeline stats.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Report folder to write.")
@click.option("--latents", "n_latents", default=100, show_default=True, help="Most frequent alive latents shown.")
@click.option("--low-entropy", "n_low_entropy", default=10, show_default=True,
              help="Also show this many of the lowest-entropy alive latents.")
@click.option("--min-references", default=5, show_default=True,
              help="Lowest-entropy picks need this many reference images (one image always has entropy 0).")
@click.option("--root", type=click.Path(path_type=Path), help="Where the dataset's images are now "
              "(default: the root recorded in the activation store).")
@click.option("--groundtruth", "groundtruth_dir", type=click.Path(path_type=Path),
              help="Ground-truth folder (pipeline groundtruth) of the same codes: adds its metrics to the report.")
def report(**options: object) -> None:
    """Static HTML report (open index.html from disk): sortable latent table, reference heatmaps."""
    from stages import report as stage

    out = stage.run(stage.Config(**options))
    click.echo(f"report of {len(out.latent_pages)} latents ({out.n_pictures} reference pictures) "
               f"in {out.seconds:.1f} s -> {out.index_path}")
    if out.image_problem:
        click.echo(f"  images not shown: {out.image_problem}")
    elif out.n_without_image:
        click.echo(f"  {out.n_without_image} references could not be opened (heatmap only; see their pages)")


@main.command("show-latent")
@click.option("--stats", "stats_dir", required=True, type=click.Path(path_type=Path), help="Folder from pipeline stats.")
@click.option("--latent", required=True, type=int, help="Latent id.")
def show_latent(stats_dir: Path, latent: int) -> None:
    """Print one latent's statistics and reference images."""
    from pipeline.latents import LatentStats

    for line in LatentStats(stats_dir).describe(latent):
        click.echo(line)


def _world_record(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, object] | None:
    """``--world``: a JSON file holding a world record, or key=value pairs such as seed=0,image_size=32."""
    if value is None:
        return None
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


@main.command()
@click.option("--stats", "stats_dir", required=True, type=click.Path(path_type=Path),
              help="Statistics folder (pipeline stats) of the codes to evaluate; it names the code and activation stores.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write: groundtruth.json, latents.csv, values.csv, groundtruth.png.")
@click.option("--world", callback=_world_record,
              help="World the store must come from, checked against the store's own: key=value pairs such as "
                   "seed=0,image_size=32,task=shape_colour, or a JSON file of those keys and held_out "
                   "(default: the store's world, unchecked).")
@click.option("--codes", "codes_dir", type=click.Path(path_type=Path),
              help="Code store (default: the one recorded in the statistics).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path),
              help="Activation store (default: the one recorded in the statistics).")
@click.option("--attributes", callback=lambda c, p, v: None if v is None else tuple(a.strip() for a in v.split(",")),
              help="Attributes to score (default: shape,colour,size,texture,background,position).")
@click.option("--score", default="max_patch", show_default=True, type=click.Choice(["max_patch", "mean"]),
              help="Image-level score: max of f over the patches, or mean over all tokens.")
@click.option("--auroc-threshold", default=0.95, show_default=True,
              help="A value has a dedicated latent when some latent reaches this AUROC for it.")
@click.option("--map-threshold", default=0.5, show_default=True,
              help="Localisation: a patch is on when f >= this fraction of the image's largest patch value.")
@click.option("--object-fraction", default=0.5, show_default=True,
              help="Localisation: a patch is an object patch when this fraction of its pixels shows the object.")
@click.option("--no-plots", is_flag=True, help="Skip groundtruth.png.")
def groundtruth(no_plots: bool, **options: object) -> None:
    """Score latents against the synthetic world: best attribute value (AUROC, purity), IoU and pointing."""
    from stages import groundtruth as stage

    out = stage.run(stage.Config(plots=not no_plots, **{k: v for k, v in options.items() if v is not None}))
    iou = "n/a" if out.mean_iou_dedicated is None else f"{out.mean_iou_dedicated:.3f}"
    click.echo(f"{out.n_covered} of {out.n_values} attribute values have a dedicated latent "
               f"(mean IoU {iou}); {out.n_latents} latents over {out.n_images} images in {out.seconds:.1f} s "
               f"-> {out.out_dir}")


def _k_list(value: str) -> tuple[int | str, ...]:
    from stages.mask import parse_k

    try:
        return tuple(parse_k(v.strip()) for v in value.split(",") if v.strip())
    except UserError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.option("--sae", "sae_dir", required=True, type=click.Path(path_type=Path), help="Trained SAE folder.")
@click.option("--stats", "stats_dir", required=True, type=click.Path(path_type=Path),
              help="Statistics folder of that SAE (pipeline stats); its class counts pick each class's top-k latents.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Results folder: masking.json, per_class.csv, accuracy_vs_k.png.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path),
              help="Activation store holding the SAE's layer: reuse its residuals, run only the blocks after the tap.")
@click.option("--adapter", type=click.Path(path_type=Path),
              help="MaPLe adapter folder (pipeline adapt --out): mask the adapted model with the base model's SAE "
                   "(reads images: a --cache store of this adapter only names them).")
@click.option("--dataset", help="Evaluation dataset (default: the --cache store's).")
@click.option("--root", help="Local dataset folder (default: the store's).")
@click.option("--split", help="Evaluation split (default: the store's, else the dataset's default).")
@click.option("--limit", type=int, help="Seeded subset of the split, as given to extract (default: the store's).")
@click.option("--seed", type=int, help="Subset and random-init seed, as given to extract (default: the store's, else 0).")
@click.option("--model", help="open_clip model name (default: the model the SAE was trained on).")
@click.option("--pretrained", help="open_clip pretrained tag, a local checkpoint file, or 'none' for random weights "
              "(default: the SAE's).")
@click.option("--layer", type=int, help="Block index to splice at (default and only choice: the SAE's layer).")
@click.option("--mode", "modes", default="on,off", show_default=True,
              callback=lambda c, p, v: tuple(m for m in v.split(",") if m.strip()),
              help="on = keep only the class's top-k latents; off = zero them.")
@click.option("--k", "ks", default="1,2,5,10,50,100,500,1000,2000,all", show_default=True,
              callback=lambda c, p, v: _k_list(v), help="Set sizes; 'all' = every latent.")
@click.option("--error-term", is_flag=True, help="Splice the sweep as x_hat_masked + (x - x_hat) (paper: without).")
@click.option("--seeds", "n_seeds", default=3, show_default=True, help="Random-latent-set baselines (0 = none).")
@click.option("--random-seed", default=0, show_default=True, help="Seed of the random sets and the probe's images.")
@click.option("--head", default="auto", show_default=True, type=click.Choice(["auto", "zeroshot", "probe"]),
              help="auto = probe for random weights (--pretrained none), zero-shot otherwise.")
@click.option("--templates", default="auto", show_default=True,
              type=click.Choice(["auto", "openai", "world", "dataset"]),
              help="Zero-shot prompt templates (auto: world for synthetic, the 80 OpenAI ones otherwise; "
              "dataset: the dataset's own, e.g. EuroSAT's 'a centered satellite photo of {}.').")
@click.option("--class-prompts", type=click.Path(path_type=Path),
              help="JSON list of class names for the prompts (or {class: prompt name}).")
@click.option("--classifier-cache", "classifier_cache_dir", type=click.Path(path_type=Path),
              default=Path.home() / ".cache" / "patchsae-pipeline" / "classifiers", show_default=True,
              help="Where zero-shot classifiers are cached per model and class names.")
@click.option("--probe-split", help="Split the probe is fit on (default: held-out images of the evaluation split).")
@click.option("--probe-images", default=1000, show_default=True,
              help="Probe training images (from the evaluation split: at most half of it).")
@click.option("--batch-size", default=32, show_default=True, help="Images per batch.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--workers", default=0, show_default=True, help="Image-decoding processes (0 = main process).")
@click.option("--full-last-block", is_flag=True,
              help="Compute the last block for every token (default: for the class token only, which is all the "
                   "pooling reads; equal up to float rounding).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plot.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def mask(full_last_block: bool, no_plots: bool, no_progress: bool, **options: object) -> None:
    """Masking experiments: accuracy with the SAE spliced in and each class's top-k latents on or off.

    The mask of an image uses its ground-truth class (the paper's protocol). Plain CLIP's
    accuracy with the head is computed first and printed before any masking.
    """
    from stages import mask as stage

    out = stage.run(stage.Config(plots=not no_plots, progress=not no_progress,
                                 class_token_only=not full_last_block, **options))
    click.echo(f"{out.head} head, {out.n_images} images, {out.n_classes} classes, layer {out.layer} "
               f"(tap from the {out.source}); sweep {out.sweep_seconds:.1f} s of {out.seconds:.1f} s")
    click.echo(f"  plain CLIP {out.clip_accuracy:.4f}   SAE all on {out.sae_all_on_accuracy:.4f}   "
               f"SAE + error term {out.sae_error_term_accuracy:.4f}")
    for mode, row in out.accuracy.items():
        rand = out.random_accuracy.get(mode, {})
        cells = "  ".join(f"k={k}: {a:.3f}" + (f" (rand {rand[k][0]:.3f}±{rand[k][1]:.3f})" if k in rand else "")
                          for k, a in row.items())
        click.echo(f"  {mode:3s} {cells}")
    click.echo(f"  -> {out.results_path}, {out.per_class_path}" + (f", {out.plot_path}" if out.plot_path else ""))


@main.command()
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=Path),
              help="Statistics folder (pipeline stats) of the base model.")
@click.option("--adapted", "adapted_dir", required=True, type=click.Path(path_type=Path),
              help="Statistics folder of the adapted model, computed with the same SAE on the same classes.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Results folder: remap.json, remap_table.md, remap.png.")
@click.option("--high", "tau_high", default=0.5, show_default=True,
              help="A latent is high for a class when its normalised count is >= this.")
@click.option("--low", "tau_low", default=0.1, show_default=True,
              help="... and low when its normalised count is <= this.")
@click.option("--normalise", default="max", show_default=True, type=click.Choice(["max", "tokens"]),
              help="Per class: divide by the most counted latent's count (max) or by the class's tokens.")
@click.option("--base-masking", type=click.Path(path_type=Path),
              help="masking.json (or its folder) of the base model with this SAE, shown beside the adapted one.")
@click.option("--adapted-masking", type=click.Path(path_type=Path),
              help="masking.json (or its folder) of the adapted model with the base model's SAE.")
@click.option("--no-plots", is_flag=True, help="Skip remap.png.")
def remap(no_plots: bool, **options: object) -> None:
    """Adaptation analysis: per class, latents high in both models, high->low and low->high (paper Table 1)."""
    from stages import remap as stage

    out = stage.run(stage.Config(plots=not no_plots, **options))
    for line in out.table_lines:
        click.echo(line)
    click.echo(f"-> {out.results_path}, {out.table_path}" + (f", {out.plot_path}" if out.plot_path else ""))


@main.command("concept-addition")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Experiment folder to create or resume (pretrain/, <task>/, concept.json, concept.md, concept.png).")
@click.option("--params", default="params.yaml", show_default=True, type=click.Path(path_type=Path),
              help="Study settings (sections pretrain, data, extract, sae, encode, stats, adapt, remap).")
@click.option("--held-out", multiple=True, default=("texture=checker",), show_default=True, metavar="ATTR=VALUE",
              help="Attribute value pretraining never shows (repeatable).")
@click.option("--task", default="texture", show_default=True,
              help="Downstream task whose classes need a held-out value.")
@click.option("--control", default="background", show_default=True,
              help="Downstream task built from seen values only.")
@click.option("--layer", type=int, help="Block whose SAE is compared (default: the first of extract.layers).")
def concept_addition(**options: object) -> None:
    """Can adaptation add a concept pretraining never showed? Pretrain a tiny CLIP without the
    held-out value, then adapt it to a task that needs that value and to a control task, and
    compare their remap tables: new concepts show as low->high latents of the held-out class.

    Rerunning the same command resumes; finished steps are skipped.
    """
    from app import concept as stage

    out = stage.run(stage.Config(**options))
    for line in out.table_lines:
        click.echo(line)
    click.echo(f"-> {out.results_path}, {out.table_path}, {out.plot_path} ({out.seconds:.0f} s)")


@main.command("run-stage")
@click.argument("name", type=click.Choice(["pretrain", "extract", "adapt", "train", "encode", "stats", "mask",
                                           "groundtruth", "remap", "report"]))
@click.option("--dataset", help="Which of data.datasets (every stage but pretrain).")
@click.option("--layer", type=int, help="Which of extract.layers (stages from train on, except adapt).")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(path_type=Path))
def run_stage(name: str, dataset: str | None, layer: int | None, params_path: Path) -> None:
    """Run one stage instance of dvc.yaml with its settings from params.yaml (what `dvc repro` calls).

    Outputs go under work/ (layout: app/study.py).
    """
    from app.params import load_params
    from app.study import run_stage as run

    click.echo(run(name, load_params(params_path), dataset, layer))


@main.command("import")
@click.argument("source_path", metavar="SOURCE", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Store directory to create or resume.")
@click.option("--shape", callback=lambda c, p, v: _int_list(v) if v else None,
              help="Raw files: n,d (tokens) or n,t,d (images x tokens).")
@click.option("--dtype", default="float16", show_default=True, help="Raw files: element type.")
@click.option("--key", help=".npz files: which array.")
@click.option("--labels", "labels_path", type=click.Path(path_type=Path), help=".npy of one integer label per row.")
@click.option("--class-names", default="", help="Comma-separated names of the labels.")
@click.option("--prefix-tokens", "n_prefix_tokens", type=int,
              help="Tokens before the patches (default 1 = class token first for n,t,d; 0 for n,d).")
@click.option("--layer", default=0, show_default=True, help="Block index to file the activations under.")
@click.option("--model", default="imported", show_default=True, help="Name of the model that produced them.")
@click.option("--overwrite", is_flag=True, help="Replace a store written from another source.")
def import_(class_names: str, **options: object) -> None:
    """Turn an (n, d) or (n, t, d) array (.npy, .npz, raw memmap) into an activation store."""
    from stages import importer as stage

    names = tuple(n for n in class_names.split(",") if n)
    out = stage.run(stage.Config(class_names=names, **options))
    click.echo(f"imported {out.n_images} x {out.n_tokens} x {out.d_model} in {out.seconds:.1f} s -> {out.store_dir}")


@main.command()
@click.option("--world", default="synthetic", show_default=True, type=click.Choice(["synthetic"]),
              help="Source of image-caption pairs (the generated world, offline).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Run folder to create or resume (model.pt, trainer_state.pt, config.json, metrics.json, loss.png).")
@click.option("--model", default="tiny-clip", show_default=True, help="open_clip model name (a registered config).")
@click.option("--steps", default=1500, show_default=True, help="Optimizer steps; each sees --batch-size fresh pairs.")
@click.option("--batch-size", default=64, show_default=True, help="Image-caption pairs per contrastive batch.")
@click.option("--lr", default=2e-3, show_default=True, help="Peak AdamW learning rate (warm-up, then cosine to 0).")
@click.option("--warmup-steps", default=30, show_default=True, help="Linear warm-up steps.")
@click.option("--positives", default="attributes", show_default=True, type=click.Choice(["attributes", "caption"]),
              help="Matches in the contrastive loss: every caption true of the image (attributes) or only its own "
                   "caption (caption, standard CLIP).")
@click.option("--weight-decay", default=0.1, show_default=True, help="AdamW weight decay on weight matrices.")
@click.option("--seed", default=0, show_default=True, help="Seed of the world's images and of the initial weights.")
@click.option("--held-out", multiple=True, default=(), metavar="ATTR=VALUE",
              help="Never show this attribute value in pretraining (repeatable), e.g. texture=checker.")
@click.option("--task", default="shape_colour", show_default=True, help="Classes of the zero-shot evaluation.")
@click.option("--templates", default="world", show_default=True, type=click.Choice(["world", "openai"]),
              help="Prompt templates of the zero-shot evaluation.")
@click.option("--eval-images", default=1000, show_default=True, help="Test-split images for zero-shot accuracy.")
@_training_options
@click.option("--workers", default=1, show_default=True, help="Processes rendering batches ahead (0 = in the loop).")
@click.option("--overwrite", is_flag=True, help="Replace a run folder trained with other settings.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def pretrain(no_progress: bool, **options: object) -> None:
    """Pretrain a tiny CLIP from scratch on the synthetic world's image-caption pairs.

    Rerunning the same command resumes from the last checkpoint; other settings in the same
    --out are refused unless --overwrite. Ends with zero-shot accuracy on the test split.
    """
    from stages import pretrain as stage

    out = stage.run(stage.Config(progress=not no_progress, **options))
    resumed = f" (resumed at step {out.start_step})" if 0 < out.start_step < out.steps else ""
    if out.start_step == out.steps:
        resumed = " (already trained)"
    click.echo(f"trained {out.steps} steps{resumed}: final loss {out.final_loss:.3f}, "
               f"zero-shot accuracy {100 * out.accuracy:.1f}% on {out.n_classes} classes "
               f"(chance {100 / out.n_classes:.1f}%), training {out.train_seconds:.1f} s, "
               f"this run {out.seconds:.1f} s")
    click.echo(f"  checkpoint {out.model_path}  (metrics {out.metrics_path.name}, curve {out.plot_path.name})")


@main.command()
@click.option("--dataset", required=True, help="Dataset to adapt to (see `pipeline extract --help`), e.g. eurosat.")
@click.option("--root", help="Local dataset folder (nothing is downloaded).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Adapter folder to create or resume (prompts.safetensors, config.json, metrics.json, loss.png).")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip model name (frozen).")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip pretrained tag, a local checkpoint file, or 'none' for random weights.")
@click.option("--shots", default=16, show_default=True, help="Training images per class (seeded draw).")
@click.option("--seed", default=0, show_default=True, help="Seed of the few-shot draw, prompt init and batch order.")
@click.option("--train-split", default="train", show_default=True, help="Split the few-shot images come from.")
@click.option("--test-split", default="test", show_default=True, help="Split the accuracies are measured on.")
@click.option("--test-limit", type=int, help="Seeded subset of the test split (default: all of it).")
@click.option("--n-ctx", default=2, show_default=True, help="Learnable context tokens per prompted layer.")
@click.option("--depth", default=9, show_default=True, help="Prompted layers of each tower (layer 0 included).")
@click.option("--ctx-init", default="a photo of a", show_default=True,
              help="Prompt prefix whose first --n-ctx tokens initialise the context; 'none' for 'X X' and random.")
@click.option("--class-prompts", type=click.Path(path_type=Path),
              help="JSON list of class names for the prompts (or {class: name}), e.g. 'annual crop land' for AnnualCrop.")
@click.option("--epochs", default=5, show_default=True, help="Passes over the few-shot images.")
@click.option("--batch-size", default=4, show_default=True, help="Images per step.")
@click.option("--lr", default=0.0035, show_default=True, help="Peak SGD learning rate (cosine to 0).")
@click.option("--warmup-epochs", default=1, show_default=True, help="Epochs at --warmup-lr before the cosine.")
@click.option("--warmup-lr", default=1e-5, show_default=True, help="Learning rate of the warm-up epochs.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="Load these MaPLe prompts instead of training: an adapter folder, its prompts.safetensors, or an "
                   "official MaPLe checkpoint.")
@click.option("--templates", default="auto", show_default=True,
              help="Base zero-shot prompts: auto (the dataset's own, else openai), openai, world, or a dataset name.")
@click.option("--eval-batch-size", default=64, show_default=True, help="Images per forward when evaluating.")
@_training_options
@click.option("--workers", default=0, show_default=True, help="Image-decoding processes (0 = main process).")
@click.option("--overwrite", is_flag=True, help="Replace an adapter folder written with other settings.")
@_world_options
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def adapt(ctx_init: str, no_progress: bool, **options: object) -> None:
    """Adapt a frozen CLIP with MaPLe prompts trained few-shot; report base vs adapted accuracy.

    Rerunning the same command resumes from the last checkpoint; other settings in the same
    --out are refused unless --overwrite. `pipeline extract --adapter OUT` then stores the
    adapted model's activations.
    """
    from stages import adapt as stage

    out = stage.run(stage.Config(ctx_init=None if ctx_init.lower() == "none" else ctx_init,
                                 progress=not no_progress, **options))
    if out.plot_path is None:
        how = "prompts loaded"
    elif out.start_step == out.steps:
        how = f"{out.steps} steps (already trained)"
    else:
        how = f"{out.steps} steps" + (f" (resumed at step {out.start_step})" if out.start_step else "")
        how += f", final loss {out.final_loss:.3f}"
    click.echo(f"MaPLe on {out.n_train_images} images ({out.n_classes} classes): {how}")
    click.echo(f"  test accuracy on {out.n_test_images} images: base zero-shot {100 * out.base_accuracy:.1f}%, "
               f"base few-shot probe {100 * out.probe_accuracy:.1f}%, adapted {100 * out.adapted_accuracy:.1f}% "
               f"(chance {100 / out.n_classes:.1f}%)")
    click.echo(f"  adapter {out.out_dir}  (prompts {out.prompts_path.name}, metrics {out.metrics_path.name}"
               + (f", curve {out.plot_path.name})" if out.plot_path else ")"))

if __name__ == "__main__":
    main()
