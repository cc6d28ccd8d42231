"""What ``inspect`` and a run's report say about a profile: a summary and its provenance."""

from __future__ import annotations

import hashlib
from typing import Any

from safelora_cli.math.lowrank import LOWRANK, RankRule
from safelora_cli.sources.profile import FORMAT, SUFFIXES, ProfileInfo

_CHUNK = 1 << 20


def describe(profile: ProfileInfo) -> dict[str, Any]:
    """A JSON-ready summary: per weight k, captured energy, error bounds and bytes; totals."""
    infos = list(profile.weights.values())
    rows = [
        {
            "weight": info.name,
            "shape": list(info.shape),
            "kind": info.kind,
            "rank": info.rank,
            "method": info.method,
            "captured_energy": info.captured_energy,
            "relative_error": info.certificate.relative_error,
            "error_bound": info.certificate.operator_bound / info.v_norm if info.v_norm else 0.0,
            "failure_probability": info.failure_probability,
            "bytes": profile.tensor_bytes(info.name),
        }
        for info in infos
    ]
    kinds = [info.kind for info in infos]
    totals = {
        "weights": len(infos),
        **{kind: kinds.count(kind) for kind in SUFFIXES},
        "max_rank": max((i.rank for i in infos if i.kind == LOWRANK), default=0),
        "max_relative_error": max((i.certificate.relative_error for i in infos), default=0.0),
        "failure_probability": failure_probability(profile),
        "tensor_bytes": sum(profile.tensor_bytes(i.name) for i in infos),
        "file_bytes": profile.header.size,
    }
    return {
        "path": str(profile.path),
        "format": FORMAT,
        "schema_version": profile.schema_version,
        "tool": profile.tool,
        "inputs": profile.inputs,
        "rank_rule": rule_json(profile.rule),
        "weights": rows,
        "tied": dict(profile.tied),  # {"lm_head.weight": the embedding it is tied to}
        "totals": totals,
    }


def provenance(profile: ProfileInfo) -> dict[str, Any]:
    """The report's record of a profile: file, sha256, schema, rank rule and the model pair it
    was made from (the ``inputs`` given when it was written)."""
    digest = hashlib.sha256()
    with profile.path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return {
        "path": str(profile.path),
        "sha256": digest.hexdigest(),
        "bytes": profile.header.size,
        "schema_version": profile.schema_version,
        "tool": profile.tool,
        "rank_rule": rule_json(profile.rule),
        "failure_probability": failure_probability(profile),
        "pair": profile.inputs,
    }


def failure_probability(profile: ProfileInfo) -> float:
    """The probability that any of the profile's certificates is not a bound: at most the sum
    of the weights' (0 when every one is exact; ``math.probe``)."""
    return min(1.0, sum(info.failure_probability for info in profile.weights.values()))


def rule_json(rule: RankRule) -> dict[str, Any]:
    """A rank rule as the profile's metadata and the report write it."""
    return {"rank": rule.rank, "tolerance": rule.tolerance, "max_rank": rule.max_rank}
