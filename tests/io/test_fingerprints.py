"""The cache tells the truth: a job's code fingerprint covers exactly the icm code it runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from icm.io.fingerprints import ROOT, code_fingerprint, job_modules, job_table, local_files

RULES = Path(__file__).resolve().parents[2] / "rules"
SCRIPTS = RULES.parent / "workflow_scripts"


def jobs(root: Path = ROOT) -> list[str]:
    """Every job function icm.jobs names."""
    return [name for name in job_table(root) if name.endswith("_job")]


def test_each_job_runs_the_modules_it_imports_and_no_others():
    modules = {job: set(job_modules(job)) for job in jobs()}
    assert "icm.probing.probes" in modules["fit_probes_job"]
    assert "icm.evaluation.metrics" in modules["compute_metrics_job"]
    assert "icm.evaluation.metrics" not in modules["generate_shard_job"] | modules["fit_probes_job"]
    assert {"icm.hooks.registry", "icm.hooks.capture"} <= modules["generate_shard_job"]
    assert {"icm.hooks.registry", "icm.hooks.steering",
            "icm.steering.pushes"} <= modules["steer_shard_job"]
    # Another job of the same module does not count: labels are not the probes' code.
    assert "icm.labeling.labelers" in modules["label_images_job"]
    assert "icm.labeling.labelers" not in modules["fit_probes_job"]
    assert "icm.probing.probes" not in modules["compute_metrics_job"]


@pytest.fixture()
def library(tmp_path):
    """A copy of the icm package to edit."""
    root = tmp_path / "icm"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def fingerprints(root):
    return {job: code_fingerprint(job, root) for job in jobs(root)}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_an_edit_changes_exactly_the_jobs_that_run_the_module(library):
    before = fingerprints(library)
    assert before == fingerprints(ROOT)  # the copy is the same code
    # A comment or a docstring is not code.
    edit(library / "evaluation/metrics.py", '"""Evaluation metrics', '"""Metrics of evaluation')
    edit(library / "hooks/registry.py", "\nimport functools", "\n# a comment\nimport functools")
    assert fingerprints(library) == before

    edit(library / "evaluation/metrics.py", "def paired_cosine(",
         "_EDITED = 1\n\n\ndef paired_cosine(")
    after = fingerprints(library)
    # The metrics, the FID statistics they read, the calibration that scores with them, and
    # (through the calibration module's imports, a cheap over-inclusion) its trade-off plot.
    assert {j for j in before if after[j] != before[j]} == {
        "compute_metrics_job", "fid_statistics_job", "calibrate_unsteered_job",
        "calibrate_variant_job", "tradeoff_job"}

    edit(library / "hooks/registry.py", "class DoubleHookError",
         "_EDITED = 1\n\n\nclass DoubleHookError")
    moved = fingerprints(library)
    hooking = {j for j in before if "icm.hooks.registry" in job_modules(j, library)}
    assert {j for j in before if moved[j] != after[j]} == hooking
    assert {"generate_shard_job", "steer_shard_job"} <= hooking


def test_the_code_cache_keeps_every_fingerprint_and_follows_an_edit(library, tmp_path,
                                                                   monkeypatch):
    """Module texts and imports kept between Snakemake starts (``code_cache_dir``): with no
    cache, a cold one and a warm one the fingerprints are the same; entries are named by
    content, so an edited module (here: a new import) is read afresh, never from a stale
    entry."""
    from icm.io import fingerprints as module

    def fresh(cache: str) -> dict[str, str]:
        for cached in (module._code_of_file, module._import_nodes, module._parse):
            cached.cache_clear()  # as a new Snakemake process starts
        monkeypatch.setenv("ICM_CODE_CACHE", cache)
        return fingerprints(library)

    plain = fresh("")
    assert fresh(str(tmp_path / "cache")) == plain == fresh(str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("*.imports"))) > 10
    assert "icm.hooks.registry" not in job_modules("collect_table_job", library)
    edit(library / "evaluation/targets.py", "\nimport ", "\nimport icm.hooks.registry\nimport ")
    edited = fresh(str(tmp_path / "cache"))
    assert "icm.hooks.registry" in job_modules("collect_table_job", library)
    assert edited["collect_table_job"] != plain["collect_table_job"]
    assert fresh("") == edited


def rule_blocks() -> dict[str, str]:
    """rule name -> its text, from every rules/*.smk."""
    blocks = {}
    for path in RULES.glob("*.smk"):
        parts = re.split(r"^rule (\w+):\n", path.read_text(), flags=re.MULTILINE)
        blocks |= dict(zip(parts[1::2], parts[2::2], strict=True))
    return blocks


def test_every_scripted_rule_carries_the_fingerprint_of_the_job_its_script_calls():
    scripted = {name: text for name, text in rule_blocks().items() if "script:" in text}
    assert len(scripted) >= 12
    for name, text in scripted.items():
        script = re.search(r'script:\s*"\.\./workflow_scripts/(\w+\.py)"', text).group(1)
        called = set(re.findall(r"\b(\w+_job)\(", (SCRIPTS / script).read_text()))
        declared = re.findall(r'code=job_code\("(\w+)"\)', text)
        assert declared and set(declared) == called, (name, declared, called)


def test_local_files_are_the_files_a_path_names(tmp_path):
    (tmp_path / "model" / "unet").mkdir(parents=True)
    (tmp_path / "model" / "unet" / "weights.safetensors").write_bytes(b"0")
    (tmp_path / "model" / "model_index.json").write_text("{}")
    (tmp_path / "model" / ".cache").mkdir()
    (tmp_path / "model" / ".cache" / "lock").write_text("")
    assert local_files(tmp_path / "model") == [str(tmp_path / "model" / "model_index.json"),
                                               str(tmp_path / "model/unet/weights.safetensors")]
    assert local_files(tmp_path / "model" / "model_index.json") == [
        str(tmp_path / "model" / "model_index.json")]
    assert local_files("openai") == local_files(None) == local_files(tmp_path / "no") == []


def test_clean_fid_statistics_are_the_file_clean_fid_reads(tmp_path, monkeypatch):
    import os

    import cleanfid
    from cleanfid.fid import test_stats_exists

    from icm.io.fingerprints import clean_fid_stats_file

    path = clean_fid_stats_file("FFHQ_trainval70k_512")
    assert Path(path).parent == Path(cleanfid.__file__).parent / "stats"
    seen = []
    monkeypatch.setattr(os.path, "exists", lambda p: seen.append(p) or False)
    test_stats_exists("ffhq_trainval70k_512", "clean")
    assert seen == [path]


def test_the_jobs_mapping_names_where_each_job_is_defined():
    """icm.jobs imports a job's module on first use: the mapping that says where must be
    right, and every adapter must import a job it names."""
    import importlib

    import icm.jobs

    for name, module in job_table().items():
        assert getattr(importlib.import_module(module), name) is getattr(icm.jobs, name)
    for script in SCRIPTS.glob("*.py"):
        names = re.findall(r"from icm\.jobs import ([\w, ]+)", script.read_text())
        assert names, script
        assert script.read_text().rstrip().endswith("\nend_job_process()"), script  # no teardown
        for name in ",".join(names).replace(" ", "").split(","):
            helpers = {"end_job_process", "logging_to", "use_threads"}
            assert name in job_table() or name in helpers, (script, name)


def test_a_job_that_runs_no_model_does_not_import_diffusers():
    """A table, merge or plot job starts in seconds: it imports neither diffusers nor
    transformers (they take ~10 s a job on 2 cores)."""
    import subprocess
    import sys

    jobs_ = ["collect_table_job", "merge_samples_job", "rank_sites_job", "fit_probes_job",
             "tradeoff_job", "target_table_job", "plot_grid_job", "merge_probes_job"]
    code = (f"import sys; from icm.jobs import {', '.join(jobs_)}; "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT.parent)
    assert result.stdout.strip() == "[]"


def test_a_finished_job_process_exits_at_once_with_its_output_flushed(tmp_path):
    """end_job_process: status 0, buffered stdout flushed, a thread still writing joined and
    the exit handlers run (a library's atexit or weakref.finalize cleanup, as icm.labeling.faces
    stops its workers)."""
    import os
    import subprocess
    import sys

    code = f"""
import atexit, logging, pathlib, threading, time
from icm.jobs import end_job_process, logging_to
atexit.register(pathlib.Path({str(tmp_path / "cleaned")!r}).touch)
late = pathlib.Path({str(tmp_path / "late")!r})
threading.Thread(target=lambda: (time.sleep(0.5), late.write_text("written"))).start()
print("result", end="")
with logging_to({str(tmp_path / "job.log")!r}):
    logging.getLogger("job").info("done")
end_job_process()
print("never")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT.parent, env=env, timeout=60)
    assert result.returncode == 0 and result.stdout == "result", result.stderr
    assert "done" in (tmp_path / "job.log").read_text() and (tmp_path / "cleaned").exists()
    assert (tmp_path / "late").read_text() == "written"  # a thread still writing is joined
