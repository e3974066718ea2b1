"""The masking sweep: every masked variant of ``pipeline.masking`` on every evaluation image.

The SAE encodes each batch of the tap once; every variant reuses those codes, and the blocks
after the tap run on stacks of variants (``tail_rows`` rows at a time). The SAE works on
smaller chunks than the source's batches when its dense codes would be large.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from pipeline import splice
from pipeline.masking import ALL, Variant
from pipeline.models import LoadedModel
from pipeline.progress import Progress
from pipeline.sae import SAE
from pipeline.sources import CacheSource, ImageSource

CODES_BUDGET_BYTES = 256 * 2**20  # dense codes of one SAE chunk (tokens x latents x 4 bytes)


def sweep(source: CacheSource | ImageSource, model: LoadedModel, sae: SAE, layer: int, eval_rows: np.ndarray,
          variants: list[Variant], top_CK: torch.Tensor | None, random_sets: torch.Tensor | None,
          head: Callable[[torch.Tensor], torch.Tensor], plain_logits: dict[int, torch.Tensor], n_classes: int, *,
          batch_size: int, tail_rows: int, class_token_only: bool, progress: bool,
          shift_D: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Every variant on every evaluation image: correct counts per (variant, class), and the largest
    |logit| difference between the error-term splice and plain CLIP (a parity check). ``shift_D``: the
    splice correction added to every variant without the error term (``splice.Correction``)."""
    correct_MC = np.zeros((len(variants), n_classes), np.int64)
    max_diff = 0.0
    d_sae = sae.config.d_sae
    chunk = max(1, min(batch_size, CODES_BUDGET_BYTES // max(1, model.n_tokens(layer) * d_sae * 4)))
    per_group = max(1, tail_rows // chunk)
    device = sae.W_dec.device
    bar = Progress(total=len(eval_rows), unit="img", desc="masking", enabled=progress)
    for batch in source.batches(eval_rows, batch_size):
        for s in range(0, len(batch.rows), chunk):
            rows = batch.rows[s:s + chunk]
            labels_B = torch.from_numpy(batch.labels[s:s + chunk])
            enc = splice.encode_tap(sae, batch.x_BTD[s:s + chunk].to(device))
            for g in range(0, len(variants), per_group):
                group = list(range(g, min(g + per_group, len(variants))))
                xs = [splice_variant(sae, enc, variants[v], labels_B, top_CK, random_sets, shift_D) for v in group]
                if batch.prompts_BXD is None:
                    feats = splice.finish_many(model.visual, xs, layer, max_rows=tail_rows,
                                               class_token_only=class_token_only)
                else:  # the prompt tokens ride along unchanged: the SAE sees the base positions only
                    feats = [source.adapted.finish(x, batch.prompts_BXD[s:s + chunk], layer) for x in xs]
                for v, f in zip(group, feats):
                    logits = head(f).cpu()
                    pred = logits.argmax(1).numpy()
                    np.add.at(correct_MC[v], labels_B.numpy(), pred == labels_B.numpy())
                    if variants[v].key == "sae_error_term":
                        ref = torch.stack([plain_logits[r] for r in rows.tolist()])
                        max_diff = max(max_diff, float((logits - ref).abs().max()))
            bar.update(len(rows))
    bar.close()
    return correct_MC, max_diff


def splice_variant(sae: SAE, enc: splice.Encoded, v: Variant, labels_B: torch.Tensor,
                   top_CK: torch.Tensor | None, random_sets: torch.Tensor | None,
                   shift_D: torch.Tensor | None = None) -> torch.Tensor:
    """The tap with variant ``v``'s latent set masked, for images of classes ``labels_B``."""
    if v.k == ALL:
        idx = None
    elif v.family == "random":
        idx = random_sets[v.seed][labels_B, :v.k]
    else:
        idx = top_CK[labels_B, :v.k]
    xhat = splice.masked_reconstruction(sae, enc, v.mode, idx)
    return splice.splice_input(enc, xhat, error_term=v.error_term, shift_D=shift_D)


def score_rows(logits: dict[int, torch.Tensor], labels: np.ndarray, rows: np.ndarray,
               n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, images) per class of the argmax of ``logits`` over ``rows``."""
    correct = np.zeros(n_classes, np.int64)
    totals = np.zeros(n_classes, np.int64)
    for r in rows.tolist():
        c = int(labels[r])
        totals[c] += 1
        correct[c] += int(int(logits[r].argmax()) == c)
    return correct, totals
