"""What a workflow job depends on besides its config: library code and local files.

Snakemake tracks a rule's script file, but the scripts hold no logic: the code that decides a
result lives in ``icm``. ``code_fingerprint`` hashes the icm modules a job function runs, so
a rule that carries it as a param reruns when, and only when, that code changes:

* the roots are the job function's own module and the icm modules imported at its
  module's top level or in the function's body, or in the module's functions it uses
  (another job function's imports do not count);
* from there every icm import of a reached module counts, at any depth (lazy imports
  inside functions included), transitively;
* ``icm.jobs`` itself (``logging_to``) is hashed, without following its lazy re-exports;
* a module counts by its syntax tree with docstrings removed: editing a comment, a
  docstring or the layout reruns nothing; any change to code does.

Everything here is plain Python (``ast``, ``hashlib``): the Snakefile imports it to build
the DAG without loading torch.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the icm package that the jobs import
JOBS_PACKAGE = "icm.jobs"


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of icm module ``name`` under ``root``, or None if there is none."""
    parts = name.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(nodes: Iterable[ast.AST], root: Path) -> set[str]:
    """icm modules named by the import statements among ``nodes`` (``from icm.x import y``
    counts ``icm.x.y`` when that is a module, else ``icm.x``)."""
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "icm"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "icm":
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found |= {s for s in subs if module_file(s, root)} or {node.module}
    return {m for m in found if module_file(m, root)}


def _parsed(path: Path) -> ast.Module:
    return _parse(path, path.stat().st_mtime_ns)  # an edited file is parsed again


@cache
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _module_imports(name: str, root: Path) -> set[str]:
    """``_imports`` of a whole module, at any depth. Its import statements are found once
    per version of its file; what they name is resolved on every call, as modules may have
    come or gone since."""
    path = module_file(name, root)
    return _imports(_import_nodes(path, path.stat().st_mtime_ns), root)


@cache
def _import_nodes(path: Path, mtime_ns: int) -> tuple[ast.AST, ...]:
    """The module's absolute import statements at any depth (relative ones name no icm
    module here, ``_imports``), kept in the code cache as their source lines."""
    def lines() -> str:
        nodes = [n for n in ast.walk(_parse(path, mtime_ns))
                 if isinstance(n, ast.Import) or isinstance(n, ast.ImportFrom) and n.level == 0]
        return "".join(ast.unparse(n) + "\n" for n in nodes)

    return tuple(ast.parse(cached_text(f"{_content_digest(path, mtime_ns)}.imports",
                                       lines)).body)


def _module_code(path: Path) -> str:
    """``_without_docstrings`` of a module file, computed once per version of the file: the
    Snakefile fingerprints some thirty jobs over the same modules (uncached, about 4.5 s of
    every Snakemake start: the SD1.5 dry run took 8.0 s, 3.5 s cached). Across processes
    too: the text is kept in ``code_cache_dir()`` under the sha256 of the file's bytes, so
    only a file whose content is new is parsed again (about 1.4 s of every start)."""
    return _code_of_file(path, path.stat().st_mtime_ns)


def code_cache_dir() -> Path | None:
    """Where docstring-free module texts are kept between Snakemake starts:
    ``$ICM_CODE_CACHE``, else ``$XDG_CACHE_HOME/icm/code`` (``~/.cache/icm/code``); an
    empty ``ICM_CODE_CACHE`` keeps nothing. Entries are named by the content they were
    made from, so a stale one can never be read for an edited file."""
    chosen = os.environ.get("ICM_CODE_CACHE")
    if chosen is not None:
        return Path(chosen) if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "icm" / "code"


@cache
def _code_of_file(path: Path, mtime_ns: int) -> str:
    return cached_text(_content_digest(path, mtime_ns),
                       lambda: _without_docstrings(_parse(path, mtime_ns)))


@cache
def _content_digest(path: Path, mtime_ns: int) -> str:
    """sha256 of a file's bytes, once per version of the file: a cache entry's name."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_text(name: str, make: Callable[[], str]) -> str:
    """``make()``, kept in ``code_cache_dir()`` as entry ``name`` (named by the content it
    was made from) and read back there on a later start."""
    folder = code_cache_dir()
    entry = folder / name if folder else None
    if entry is not None and entry.is_file():
        return entry.read_text()
    text = make()
    if entry is not None:
        write_cache_entry(entry, text)
    return text


def write_cache_entry(entry: Path, text: str) -> None:
    """Write a cache entry whole, then rename it: a reader never sees half of one. A
    read-only cache leaves fingerprints the same, only slower."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(f".{entry.name}.{os.getpid()}")
        partial.write_text(text)
        partial.replace(entry)
    except OSError:
        pass


def _without_docstrings(tree: ast.Module) -> str:
    """The syntax tree as text, docstrings dropped (comments are never in it)."""
    tree = ast.parse(ast.unparse(tree))  # a copy
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def job_table(root: Path = ROOT) -> dict[str, str]:
    """Job function -> its module: the ``JOBS`` mapping of ``icm/jobs/__init__.py``, read
    off its syntax tree (``"fit_probes_job": "icm.jobs.probing"``)."""
    package = _parsed(module_file(JOBS_PACKAGE, root))
    for node in package.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "JOBS" and node.value is not None:
            return dict(ast.literal_eval(node.value))
    raise KeyError(f"{JOBS_PACKAGE} defines no JOBS mapping")


def job_function_module(function: str, root: Path = ROOT) -> str:
    """The module defining job function ``function``."""
    table = job_table(root)
    if function in table:
        return table[function]
    package = _parsed(module_file(JOBS_PACKAGE, root))
    if any(isinstance(n, ast.FunctionDef) and n.name == function for n in package.body):
        return JOBS_PACKAGE
    raise KeyError(f"{function!r} is not a job of {JOBS_PACKAGE}")


def job_modules(function: str, root: Path = ROOT) -> list[str]:
    """The icm modules whose code job function ``function`` runs, sorted."""
    module = job_function_module(function, root)
    tree = _parsed(module_file(module, root))
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    if function not in defs:
        raise KeyError(f"{module} defines no function {function!r}")
    # The job function and the module-level functions and classes it uses, transitively.
    used, todo = set(), [function]
    while todo:
        name = todo.pop()
        if name not in used:
            used.add(name)
            todo += [n.id for n in ast.walk(defs[name])
                     if isinstance(n, ast.Name) and n.id in defs and n.id not in used]
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    nodes = [node for name in used for node in ast.walk(defs[name])]
    seen = {JOBS_PACKAGE, module}  # hashed; the package itself imports no job module
    pending = _imports([*top, *nodes], root) - seen
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending |= _module_imports(name, root) - seen
    return sorted(seen)


def code_fingerprint(function: str, root: Path = ROOT) -> str:
    """sha256 of the docstring-free code of ``job_modules(function)``: a rule param."""
    digest = hashlib.sha256()
    for name in job_modules(function, root):
        digest.update(name.encode())
        digest.update(_module_code(module_file(name, root)).encode())
    return digest.hexdigest()[:16]


def local_files(path: str | os.PathLike[str] | None) -> list[str]:
    """The files a local path names, for a rule's input: the file itself, or every file in
    a folder (sorted, hidden ones left out); nothing for hub ids, tags or missing paths,
    which stay params."""
    if not path:
        return []
    path = Path(path).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return []


def clean_fid_stats_file(name: str) -> str | None:
    """The file clean-fid keeps custom statistics ``name`` in (mode clean, Inception),
    where ``cleanfid.fid.make_custom_stats`` writes it; None without clean-fid."""
    spec = importlib.util.find_spec("cleanfid")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "stats" / f"{name}_clean_custom_na.npz".lower())
