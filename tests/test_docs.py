"""What the README and docs/ promise users is true: every config key is documented, and
every command in a README code block still parses."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_helpers import snakemake

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))


def schema_keys() -> set[str]:
    """Every property name in schemas/config.schema.yaml, at any depth."""
    keys: set[str] = set()

    def walk(node: object) -> None:
        if not isinstance(node, dict):
            return
        for key, child in (node.get("properties") or {}).items():
            keys.add(key)
            walk(child)
        walk(node.get("additionalProperties"))

    walk(yaml.safe_load((ROOT / "schemas/config.schema.yaml").read_text()))
    return keys


def test_every_config_key_is_documented():
    """Named in backticks, alone or inside a dotted path (`concepts.<c>.steering.k`)."""
    prose = re.sub(r"```.*?```", "", DOCS, flags=re.DOTALL)  # fenced blocks break the pairs
    spans = re.findall(r"`([^`\n]+)`", prose)
    named = {word for span in spans for word in re.findall(r"[A-Za-z_][\w-]*", span)}
    assert schema_keys() - named == set()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_readme_code_blocks_hold_only_commands_we_check():
    kinds = {shlex.split(c)[0] for c in readme_commands()}
    assert kinds <= {"make", ".venv/bin/snakemake", ".venv/bin/python"}, kinds


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command, workdir):
    """Targets plan (`snakemake -n`), CLIs answer --help, make targets exist (`make -n`)."""
    words = shlex.split(command)
    if words[0] == "make":
        result = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True,
                                text=True, check=False)
    elif words[0].endswith("snakemake"):
        result = snakemake(workdir, "-n", *[w for w in words[1:] if w not in ("-n",)])
    else:  # python -m icm SUBCOMMAND ARGS: the subcommand exists
        module = words.index("-m")
        result = subprocess.run([sys.executable, *words[module:module + 3], "--help"],
                                capture_output=True, text=True, check=False)
    assert result.returncode == 0, (command, result.stdout[-1000:], result.stderr[-2000:])


def test_the_paper_overlay_names_each_missing_file_then_plans(workdir):
    """README's "Reproduce the paper on SD1.5": with `configs/sd15-paper.yaml` and none of
    its files, the workflow refuses at start naming each one; once they exist it plans the
    Table 1 gender target (the files here are empty stand-ins: a dry run reads none)."""
    overlay = yaml.safe_load((ROOT / "configs/sd15-paper.yaml").read_text())
    files = {overlay["evaluation"]["clip_pretrained"]}
    for concept in overlay["concepts"].values():
        files |= {concept["labeler"]["pretrained"], concept["evaluation"]["labeler"]["weights"],
                  concept["evaluation"]["fid_reference"]}
    assert len(files) == 3
    args = ("-n", "results/sd15/gender/table.csv", "--configfile", "config.yaml",
            "configs/sd15-paper.yaml")
    refused = snakemake(workdir, *args)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and all(f"'{name}'" in said for name in files), said[-2000:]
    for name in files:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).touch()
    planned = snakemake(workdir, *args)
    said = planned.stdout + planned.stderr
    assert planned.returncode == 0 and "compute_metrics" in said, said[-2000:]
