"""``safelora schema``: the report's JSON Schema (draft 2020-12), as shipped in the package."""

from __future__ import annotations

from safelora_cli.cli._app import app
from safelora_cli.cli._errors import errors_to_exit
from safelora_cli.display.terminal import write_stdout

EXAMPLES = """\b
Examples:
  safelora schema > safelora-report.schema.json
  check-jsonschema --schemafile safelora-report.schema.json my-lora-safe/safelora_report.json
  python -c 'import json, jsonschema, subprocess; jsonschema.validate(
      json.load(open("report.json")),
      json.loads(subprocess.run(["safelora", "schema"], capture_output=True).stdout))'
"""


@app.command("schema", epilog=EXAMPLES)
def schema_command() -> None:
    """Print the JSON Schema (draft 2020-12) of safelora's reports: one report, or the list a
    batch prints with --json; every kind (adapter, merged, full fine-tune, through a profile)."""
    with errors_to_exit():
        from safelora_cli.output.report import json_schema_text

        write_stdout(json_schema_text())
