"""The documentation against the code: every `lm` command in README.md and docs/*.md parses with
the real argument parser, names config files and keys that exist, and every path or module the
docs point to is still there.

Only `lm.cli` and `lm.config` are imported (no JAX in this file), so the whole module runs in a
fraction of a second. A fenced block preceded by the line `<!-- docs-test: skip -->` is not
checked: the explicit mark for a placeholder that cannot be a real command.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest

from lm import config as lm_config
from lm.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# benchmarks/README.md holds measured numbers, not `lm` commands, but it names modules too.
DOCS_WITH_PATHS = [*DOCS, ROOT / "benchmarks" / "README.md"]
SKIP_MARK = "<!-- docs-test: skip -->"
# Each config section (model, mesh, data, ...) with the names of its keys.
KEYS = {
    section.name: {key.name for key in dataclasses.fields(section.default_factory)}
    for section in dataclasses.fields(lm_config.Config)
}
OVERRIDE = re.compile(r"(?<![\w./-])(" + "|".join(KEYS) + r")\.([A-Za-z_]\w*)=")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclasses.dataclass(frozen=True)
class Snippet:
    """One logical line of a fenced code block (backslash continuations joined)."""

    path: Path
    line: int  # 1-based line of the first physical line
    text: str

    @property
    def where(self) -> str:
        return f"{_rel(self.path)}:{self.line}"


def _code_lines(path: Path) -> list[Snippet]:
    """Logical lines inside fenced code blocks, except blocks marked with SKIP_MARK."""
    snippets, in_block, skip, previous = [], False, False, ""
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_block = not in_block
            skip = in_block and previous == SKIP_MARK
            pending = None
        elif in_block and not skip:
            start, text = pending if pending else (number, "")
            text += raw.rstrip()
            if text.endswith("\\"):
                pending = (start, text[:-1] + " ")
            else:
                pending = None
                snippets.append(Snippet(path, start, text))
        if stripped:
            previous = stripped
    return snippets


def _lm_argv(text: str) -> list[str] | None:
    """The arguments after `lm` when the line runs the `lm` command (directly, from the venv, or
    through a launcher in launch/, after any environment assignments); None for any other
    line."""
    text = text.strip()
    text = text.removeprefix("$ ")
    text = re.sub(r"^([A-Z_][A-Z0-9_]*=\S+\s+)+", "", text)  # environment assignments
    if not re.match(r"(lm|\.venv/bin/lm|launch/local\.sh|sbatch)\s", text):
        return None
    words = shlex.split(text, comments=True)
    if words[0] in ("lm", ".venv/bin/lm"):
        return words[1:]
    # Launchers: `launch/local.sh N lm ...`, `sbatch [options] launch/slurm.sbatch lm ...`.
    return words[words.index("lm") + 1 :] if "lm" in words else None


def _documented_commands() -> list[tuple[Snippet, list[str]]]:
    found = []
    for path in DOCS:
        for snippet in _code_lines(path):
            argv = _lm_argv(snippet.text)
            if argv is not None:
                found.append((snippet, argv))
    return found


COMMANDS = _documented_commands()


def test_the_docs_show_lm_commands_and_readme_names_both_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert len(COMMANDS) >= 20, f"found only {len(COMMANDS)} `lm` commands in the docs"
    documented = {argv[0] for _, argv in COMMANDS}
    every_command = {"pretrain", "finetune", "evaluate", "generate", "convert", "tokenizer"}
    every_command |= {"bench", "plan"}
    assert every_command <= documented, f"commands without an example: {every_command - documented}"


def _strict(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` and its subcommands without prefix matching: argparse would read the typo
    `--max-new-token` as `--max-new-tokens`, but the docs should spell every flag out."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)
    return parser


def _parse(snippet: Snippet, argv: list[str]):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return _strict(_parser()).parse_args(argv)
    except SystemExit:
        pytest.fail(
            f"{snippet.where}: `lm {shlex.join(argv)}` does not parse: "
            f"{stderr.getvalue().strip().splitlines()[-1]}"
        )


@pytest.mark.parametrize(
    ("snippet", "argv"), COMMANDS, ids=[snippet.where for snippet, _ in COMMANDS]
)
def test_documented_command_parses_and_its_config_and_overrides_exist(snippet, argv):
    args = _parse(snippet, argv)
    config = getattr(args, "config", None)
    if config is not None:
        assert (ROOT / config).is_file(), f"{snippet.where}: --config {config} does not exist"
    overrides = getattr(args, "overrides", [])
    try:
        # Keys and value types, as the command would read them (pure: no JAX, no files written).
        lm_config.build_config(ROOT / config if config else None, overrides)
    except lm_config.ConfigError as error:
        pytest.fail(f"{snippet.where}: `{snippet.text.strip()}`: {error}")


def _config_paths_mentioned() -> list[tuple[str, str]]:
    return [
        (f"{_rel(path)}:{number}", match)
        for path in DOCS
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        for match in re.findall(r"configs/[\w/.-]+\.yaml", line)
    ]


def test_every_config_file_the_docs_mention_exists():
    missing = [f"{where}: {name}" for where, name in _config_paths_mentioned()]
    missing = [m for m in missing if not (ROOT / m.split(": ")[1]).is_file()]
    assert not missing, "config files named in the docs do not exist:\n" + "\n".join(missing)


def test_every_section_key_override_in_the_docs_names_a_real_config_key():
    """Overrides in prose too (`mesh.data=-1 ...`), where the value may be a placeholder."""
    unknown = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for section, key in OVERRIDE.findall(line):
                if key not in KEYS[section]:
                    unknown.append(f"{_rel(path)}:{number}: {section}.{key}")
    assert not unknown, "unknown config keys in the docs:\n" + "\n".join(unknown)


def test_configuration_reference_lists_every_config_key_and_no_other():
    text = (ROOT / "docs" / "configuration.md").read_text()
    listed = set(re.findall(r"^\| `(\w+\.\w+)` \|", text, flags=re.MULTILINE))
    real = {f"{section}.{key}" for section, keys in KEYS.items() for key in keys}
    assert not real - listed, f"keys missing from docs/configuration.md: {sorted(real - listed)}"
    assert not listed - real, f"keys that no longer exist: {sorted(listed - real)}"


def test_configuration_reference_defaults_match_the_dataclasses():
    """The default column, for the keys whose default is a plain number or bool."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    wrong = []
    for name, shown in re.findall(r"^\| `(\w+\.\w+)` \| ([^|]+) \|", text, flags=re.MULTILINE):
        section, key = name.split(".")
        if key not in KEYS.get(section, ()):
            continue  # reported by the test above
        default = getattr(getattr(lm_config.Config(), section), key)
        shown = shown.strip().strip("`")
        if isinstance(default, bool):
            ok = shown == str(default).lower()
        elif isinstance(default, int | float):
            ok = float(shown) == float(default)
        else:
            ok = shown == (default or '""') or shown == repr(default).replace("'", '"')
        if not ok:
            wrong.append(f"{name}: docs say {shown}, code says {default!r}")
    assert not wrong, "\n".join(wrong)


# Paths in prose and code: lm/..., tests/..., configs/..., benchmarks/..., launch/..., docs/...
PATH = re.compile(r"(?<![\w./-])((?:lm|tests|configs|benchmarks|launch|docs)/[\w./-]*[\w/])")
# Module references: `lm.inference.generator.Generator`, `from lm.config import load_config`.
MODULE = re.compile(r"(?<![\w./-])(lm(?:\.\w+)+)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _mentions(pattern: re.Pattern) -> list[tuple[str, str, Path]]:
    return [
        (f"{_rel(path)}:{number}", match, path)
        for path in DOCS_WITH_PATHS
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        for match in pattern.findall(line)
    ]


def test_every_repository_path_the_docs_mention_exists():
    missing = [
        f"{where}: {name}"
        for where, name, _ in _mentions(PATH)
        # Globs and dot-directories (local venvs the docs tell you to create) are not in git.
        if not (ROOT / name.rstrip("/")).exists() and "*" not in name and "/." not in name
    ]
    assert not missing, "paths named in the docs do not exist:\n" + "\n".join(missing)


def test_every_relative_link_in_the_docs_resolves():
    broken = [
        f"{where}: {target}"
        for where, target, path in _mentions(LINK)
        if "://" not in target and not (path.parent / target).exists()
    ]
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def _top_level_names(module: Path) -> dict[str, set[str]]:
    """Names a module defines at top level, each with its class's attributes (else empty)."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            attrs = set()
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        attrs.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        attrs.add(item.target.id)
            names[node.name] = attrs
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({t.id: set() for t in targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.ImportFrom):
            names.update({a.asname or a.name: set() for a in node.names})
    return names


def _resolve(dotted: str) -> str | None:
    """None when `lm.pkg.module[.Name[.attr]]` exists in the source tree, else what is missing."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:split])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.is_file():
            break
    else:
        return f"no module {dotted}"
    rest = parts[split:]
    if not rest:
        return None
    names = _top_level_names(module)
    if rest[0] not in names:
        return f"{'.'.join(parts[:split])} defines no {rest[0]}"
    if len(rest) > 1 and names[rest[0]] and rest[1] not in names[rest[0]]:
        return f"{rest[0]} has no attribute {rest[1]}"
    return None


def test_every_lm_module_and_name_the_docs_mention_exists():
    problems = [
        f"{where}: {name}: {problem}"
        for where, name, _ in _mentions(MODULE)
        if (problem := _resolve(name)) is not None
    ]
    assert not problems, "modules named in the docs do not exist:\n" + "\n".join(problems)


def test_architecture_traces_name_methods_that_exist():
    """`Class.method` in docs/architecture.md (e.g. `Transformer.hidden_cached`) for classes
    defined in lm/: the traces of a training step and a generated token stay true."""
    classes: dict[str, set[str]] = {}
    for module in ROOT.joinpath("lm").rglob("*.py"):
        for name, attrs in _top_level_names(module).items():
            if attrs:
                classes.setdefault(name, set()).update(attrs)
    text = (ROOT / "docs" / "architecture.md").read_text()
    stale = [
        f"{owner}.{attr}"
        for owner, attr in re.findall(r"`([A-Z]\w*)\.(\w+)", text)
        if owner in classes and attr not in classes[owner]
    ]
    assert not stale, f"docs/architecture.md names methods that do not exist: {stale}"
