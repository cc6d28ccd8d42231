"""What a finished run hands to CI, from its report dicts: the ``--junit`` file and, in GitHub
Actions, the step summary and the ``::error``/``::warning`` annotations.

The one place ``score`` and ``patch`` publish these: ``check`` before any work (the ``--junit``
target is refused as ``--report`` is), ``publish`` after the run. Outside GitHub Actions only
``--junit`` does anything.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safelora_cli.inputs.config import RunConfig
from safelora_cli.output.ci import github
from safelora_cli.output.report import subject
from safelora_cli.untrusted import safe_text


@dataclass(frozen=True)
class CiOutputs:
    """The CI outputs of one ``score`` or ``patch`` invocation."""

    junit: Path | None
    force: bool = False

    def check(
        self,
        paths: Sequence[str],
        config: RunConfig,
        output: Path | None = None,
        report: Path | None = None,
    ) -> None:
        """Refuse a ``--junit`` target before any work (see ``junit.check_junit_path``)."""
        if self.junit is None:
            return
        from safelora_cli.output.ci.junit import check_junit_path

        refs = [*paths, config.base, config.aligned, config.profile]
        inputs = [Path(ref) for ref in refs if ref is not None and Path(ref).exists()]
        check_junit_path(
            self.junit, inputs=inputs, output=output, force=self.force, others={"--report": report}
        )

    def publish(self, reports: Sequence[dict[str, Any]], gates: Mapping[int, str]) -> None:
        """Write ``--junit``; in GitHub Actions, append the step summary and print annotations.

        Args:
            reports: the run's reports, in order.
            gates: report index -> why it failed ``--fail-if-projected`` (empty: no gate).
        """
        if self.junit is not None:
            from safelora_cli.output.ci.junit import write_junit

            write_junit(self.junit, reports)
        if not github.active():
            return
        for report in reports:
            for warning in report.get("warnings") or []:
                _annotate("warning", f"{subject(report)}: {warning.get('message')}")
        for index, why in gates.items():
            _annotate("error", f"{subject(reports[index])}: {why}")
        path = github.summary_path()
        if path is None:
            return
        from safelora_cli.display.markdown import reports_markdown

        try:
            github.append_summary(path, reports_markdown(reports, gates))
        except Exception as exc:  # noqa: BLE001 - a summary never fails a finished run
            message = f"could not write the step summary: {exc}"
            print(f"warning: {safe_text(message)}", file=sys.stderr)
            _annotate("warning", message)


def _annotate(level: str, message: str) -> None:
    """A workflow command on stderr: the runner reads both streams; stdout is the result's."""
    print(github.annotation(level, message), file=sys.stderr)
