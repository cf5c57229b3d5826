"""The retrieval correction in numpy: the bundle's ``model/correction`` folder, as `anybind.align.corrections`.

Queries are never changed; a gallery is corrected once (`gallery`) and then ranked by cosine minus
each item's offset (`rank_scores`; dual-softmax multiplies by the cosine as well).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import AnybindError
from .blend import l2, read_saved_part

SIDES = ("image", "text")


class Correction:
    """`gallery(side, emb)` -> (corrected rows, per-row offset or None); `rank_scores(cosines, offset)`."""

    def __init__(self, directory: Path):
        config, self.bank = read_saved_part(directory, "correction")
        self.name, self.options = config["name"], config.get("options", {})
        if self.name not in ("none", "qb-norm", "dual-softmax", "invgc"):
            raise AnybindError(f"the bundle's '{self.name}' retrieval correction is not one anybind.runtime runs")
        if self.name != "none" and set(self.bank) != set(SIDES):
            raise AnybindError(f"{directory}: the '{self.name}' correction's bank lacks a side: export the bundle again")

    def gallery(self, side: str, emb: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray | None]:
        """The gallery of `side` as the model ranks it (the other side queries)."""
        other = SIDES[1 - SIDES.index(side)]
        if self.name == "none":
            return emb, None
        if self.name == "invgc":
            return self._invgc(side, other, emb), None
        beta = float(self.options["beta"])
        g = l2(emb.astype(np.float32))
        offsets = [_logsumexp(beta * (self.bank[other] @ g[lo : lo + chunk].T)) for lo in range(0, len(g), chunk)]
        return emb, (np.concatenate(offsets) / beta).astype(np.float32)

    def _invgc(self, side: str, other: str, emb: np.ndarray) -> np.ndarray:
        x = l2(emb.astype(np.float32))
        update = x.copy()
        for rate, bank in ((self.options["r_g"], self.bank[side]), (self.options["r_q"], self.bank[other])):
            if rate == 0.0:
                continue
            k = min(int(self.options["k"]), len(bank))
            sims = x @ bank.T
            idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            top = np.take_along_axis(sims, idx, 1)
            update -= (rate / k) * np.einsum("bk,bkd->bd", top, bank[idx])
        return l2(update)

    def rank_scores(self, cosines: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        """Ranking keys of [queries, gallery] cosines: higher ranks first."""
        if offset is None:
            return cosines
        if self.name == "dual-softmax":
            s = cosines.astype(np.float64)
            return s * np.exp(float(self.options["beta"]) * (s - offset.astype(np.float64)))
        return cosines - offset


def _logsumexp(block: np.ndarray) -> np.ndarray:
    """logsumexp over axis 0 of a [bank, gallery] block."""
    top = block.max(0)
    return top + np.log(np.exp(block - top).sum(0))
