"""The output head of a model: stored as ``lm_head.weight``, or tied to the input embedding.

transformers ties ``lm_head`` to the input embedding (one matrix for both) when config.json says
``tie_word_embeddings: true``; a config without the key gets its architecture's default, so
the files decide: a model that stores no ``lm_head.weight`` ties it. One rule, from headers and
config.json only, for pairing (an adapter's ``lm_head``), the profile (``--targets lm_head``)
and the merge:

    tie_word_embeddings   lm_head.weight stored   the head is
    true                  no                      the embedding (tied)
    true                  yes, same shape         the embedding (tied); the stored lm_head.weight
                                                  is taken as its copy (``tied-head-stored``)
    true                  yes, another shape      an error: the config contradicts the weights
    absent                no / yes                the embedding (tied) / lm_head.weight
    false                 yes / no                lm_head.weight / missing (an error)

A base and an aligned model whose heads differ in this (one tied, the other not, or tied to
differently named embeddings) do not belong together: V of the head would be the difference of
two different matrices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from safelora_cli.errors import IncompatibleInputError
from safelora_cli.inputs.index import TensorIndex
from safelora_cli.inputs.smallfiles import load_json
from safelora_cli.notices import Notices

HEAD = "lm_head.weight"
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")
TIED_FALLBACKS = {HEAD: EMBEDDINGS}
MODEL_CONFIG = "config.json"
TIED_HEAD_STORED = "tied-head-stored"


def model_config(index: TensorIndex) -> dict[str, Any]:
    """The folder's config.json, or {} when it has none (it is optional); one that is there is
    read like any other input, and a broken one is an error."""
    path = index.root / MODEL_CONFIG
    if not os.path.lexists(path):
        return {}
    return load_json(path, "model config")


@dataclass(frozen=True)
class Head:
    """How one model stores its output head.

    ``weight``: the stored tensor used as the head (None: there is none); ``tied``: it is the
    input embedding; ``copy``: ``lm_head.weight`` is stored too, beside the tied embedding;
    ``problem``: the config contradicts the weights (a "copy" of another shape).
    """

    weight: str | None
    tied: bool
    reason: str
    copy: bool = False
    problem: str | None = None

    def describe(self) -> str:
        if self.weight is None:
            return f"has no {HEAD} ({self.reason})"
        if self.tied:
            return f"ties lm_head to {self.weight} ({self.reason})"
        return f"stores {HEAD} ({self.reason})"


def model_head(index: TensorIndex, config: dict[str, Any] | None = None) -> Head:
    """The head of the model in ``index`` (config.json read from its folder unless given)."""
    config = model_config(index) if config is None else config
    flag = config.get("tie_word_embeddings")
    flag = flag if isinstance(flag, bool) else None
    stored = index.get(HEAD)
    embedding = next((index.get(n) for n in EMBEDDINGS if n in index), None)
    if flag is False or embedding is None or (flag is None and stored is not None):
        said = "config.json: tie_word_embeddings false" if flag is False else "untied"
        said = said if embedding is not None else "no input embedding found"
        return Head(HEAD if stored is not None else None, False, said)
    if flag is None:
        return Head(embedding.name, True, f"no {HEAD} stored")
    said = "config.json: tie_word_embeddings true"
    if stored is None:
        return Head(embedding.name, True, said)
    if stored.shape != embedding.shape:
        problem = (
            f"config.json of {index.root.name} ties lm_head to {embedding.name} "
            f"{list(embedding.shape)}, but {HEAD} is stored as {list(stored.shape)}: the config "
            "contradicts the weights"
        )
        return Head(embedding.name, True, said, copy=True, problem=problem)
    return Head(embedding.name, True, said, copy=True)


@dataclass(frozen=True)
class PairHeads:
    """The heads of a base and an aligned model, side by side."""

    base: Head
    aligned: Head

    @property
    def tied_to(self) -> str | None:
        """The embedding both models tie lm_head to; None unless they agree that it is tied."""
        if self.problem() is None and self.base.tied and self.aligned.tied:
            return self.base.weight
        return None

    def problem(self) -> str | None:
        """Why the two heads cannot make a V (None: they can, or neither model has one)."""
        for head in (self.base, self.aligned):
            if head.problem is not None:
                return head.problem
        if (self.base.tied, self.base.weight) == (self.aligned.tied, self.aligned.weight):
            return None
        if self.base.weight is None or self.aligned.weight is None:
            return None  # a missing head is reported as a missing weight
        return (
            f"base and aligned disagree on tied embeddings: the base model "
            f"{self.base.describe()}, the aligned model {self.aligned.describe()}"
        )

    def copy_note(self, module: str = "lm_head") -> str | None:
        """What a ``tied-head-stored`` notice says, when a tied model stores lm_head.weight too."""
        sides = [side for side, h in (("base", self.base), ("aligned", self.aligned)) if h.copy]
        if not sides or self.tied_to is None:
            return None
        return (
            f"{module}: config.json ties it to {self.tied_to} and the {' and '.join(sides)} "
            f"model also stores {HEAD}: {module} is treated as tied (V and the report use "
            f"{self.tied_to}; {HEAD} is taken as its copy, as transformers does when the two are "
            "equal); if it is a separate head, set tie_word_embeddings to false"
        )


def profiled_head(heads: PairHeads, targeted: bool, notices: Notices) -> str | None:
    """For a profile of the pair: the embedding its tied head is recorded as (None: untied, or
    the pair disagrees). ``targeted``: ``--targets`` reaches ``lm_head``, which then needs
    heads that agree (and a stored copy gets its ``tied-head-stored`` notice).

    Raises:
        IncompatibleInputError: ``targeted``, and the two models' heads differ.
    """
    if not targeted:
        return heads.tied_to
    problem = heads.problem()
    if problem is not None:
        raise IncompatibleInputError(
            f"--targets lm_head: {problem}",
            "give the base and aligned models of one family: both tie lm_head, or neither",
        )
    note = heads.copy_note()
    if note is not None:
        notices.add(TIED_HEAD_STORED, note, values={"weight": heads.tied_to, "copy": HEAD})
    return heads.tied_to


def pair_heads(base: TensorIndex, aligned: TensorIndex) -> PairHeads:
    """The heads of a model pair (config.json read from each folder)."""
    return PairHeads(model_head(base), model_head(aligned))
