"""Every shell command in README.md and docs/*.md still works, so the documents cannot rot.

Commands are read from fenced ``bash``/``sh``/``shell``/``console`` blocks (``\\`` continuations
joined, ``# comments`` dropped, ``NAME=value`` lines set ``$NAME`` for the rest of the block,
``a && b`` checked as two commands, ``<...>`` is a placeholder for the reader's value). Each command
is checked by what it runs, without training or touching data:

- ``python train/pretrain.py ...`` and ``python train/analyze.py ...``: the arguments go through
  Hydra's override parser (what the shell leaves of the quotes), the config is composed, and
  vitreg's validation (``validate_config`` / ``validate_analyze_config``, which ``--cfg job`` skips)
  runs on it. Paths named in the command are the reader's files: validation treats them as
  existing. ``-m`` sweeps are composed per value; ``--cfg``/``--resolve``/``...`` are dropped.
- launchers (``sbatch slurm/*.sbatch``, ``srun``, ``torchrun``) are not run: the overrides they pass
  to ``train/pretrain.py`` / ``train/analyze.py`` are checked as above.
- ``python scripts/<name>.py ...`` and ``python benchmarks/<name>.py ...``: the script runs in-process
  until it has parsed its arguments with argparse (a wrong flag fails as it would in the shell), then
  stops before doing any work.
- Overrides of ``hydra/...`` (e.g. ``hydra/launcher=submitit_slurm``) are composed with Hydra's own
  config; without the optional launcher plugin such commands are skipped.
- ``SKIP``: commands that cannot run here in seconds (training, the whole suite, installs, W&B
  uploads, GPU-only checks), each with its reason.

Anything else fails, naming the file, the line and the command: teach this test how to check it or
add a ``SKIP`` rule with the reason. New commands are picked up without touching this file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import itertools
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/*.md")
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}

# (pattern on the command as written, why it is not run here). Keep each reason honest.
SKIP: tuple[tuple[str, str], ...] = (
    (r"^(time )?make (demo|test)\b", "trains the demo for minutes / runs the whole suite (CI: `make test`)"),
    (r"^make setup\b", "creates the virtual environment and installs torch (CI: `make setup`)"),
    (r"(^|\s)(\S*/)?pip3? install\b", "installs packages"),
    (r"^wandb sync\b", "uploads offline runs to the W&B server (network, credentials)"),
    (r"^bash \.\./shared/gpu/", "stages the GPU check on the GPU machine"),
    (r"-m pytest -m gpu\b", "the GPU tests, skipped without a GPU"),
    (r"^git archive\b", "extracts an older commit for a before/after benchmark (a shallow clone may lack it)"),
)
if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:  # the optional `slurm` extra
    SKIP += (
        (r"hydra/launcher=submitit", "needs the optional hydra-submitit-launcher plugin (pip install -e '.[slurm]')"),
    )
LAUNCHERS = {"srun", "torchrun", "sbatch"}  # their options come first; then the program and its arguments
SBATCH_SCRIPTS = {"slurm/pretrain.sbatch": "train/pretrain.py", "slurm/sweep_registers.sbatch": "train/pretrain.py"}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd"}
HYDRA_FLAGS = {"-m", "--multirun", "--resolve"}
MAX_SWEEP_COMBINATIONS = 8


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    text: str  # as written (continuations joined)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


# --------------------------------------------------------------------------------------------- reading
def shell_commands(markdown: str, file: str) -> list[Command]:
    """The commands of the shell blocks of one document, with the line each starts on."""
    commands: list[Command] = []
    lang: str | None = None
    variables: dict[str, str] = {}
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(markdown.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", raw)
        if fence:
            lang, variables = (fence.group(1) if lang is None else None), {}
            continue
        if lang not in SHELL_BLOCKS:
            continue
        line = raw.strip()
        if not pending:
            if not line or line.startswith("#"):
                continue
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        text = " ".join([*pending, line])
        pending = []
        for part in re.split(r"\s&&\s", strip_comment(text)):
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(\S*)", part.strip())
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            commands.append(Command(file, start, substitute(part.strip(), variables)))
    return commands


def strip_comment(text: str) -> str:
    """``text`` without a trailing ``# comment`` (a ``#`` outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text


def substitute(text: str, variables: dict[str, str]) -> str:
    text = re.sub(r"<[^<>]*>", "X", text)  # <task dir>: the reader's value
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def documented_commands() -> list[Command]:
    files = sorted({p for pattern in DOCUMENTS for p in ROOT.glob(pattern)})
    return [c for path in files for c in shell_commands(path.read_text(), str(path.relative_to(ROOT)))]


# -------------------------------------------------------------------------------------------- checking
class ArgumentsParsed(Exception):
    """Raised once a script has parsed its arguments: the check stops before the script works."""


def skip_reason(command: Command) -> str | None:
    return next((reason for pattern, reason in SKIP if re.search(pattern, command.text)), None)


def split_program(argv: list[str]) -> tuple[str, list[str]]:
    """(program, arguments) with environment assignments, launchers and their options removed."""
    while argv and re.fullmatch(r"[A-Za-z_]\w*=\S*", argv[0]):
        argv = argv[1:]
    if argv and argv[0] in LAUNCHERS:
        launcher, argv = argv[0], argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]  # --nodes=4, --nproc_per_node=8, --kill-on-bad-exit=1
        if launcher == "sbatch" and argv and argv[0] in SBATCH_SCRIPTS:
            return SBATCH_SCRIPTS[argv[0]], argv[1:]
        return split_program(argv)
    if argv and re.fullmatch(r"(\S*/)?python3?", argv[0]):
        argv = argv[1:]
    if not argv:
        return "", []
    return argv[0], argv[1:]


def check(command: Command) -> None:
    """Raise AssertionError naming the command when it would fail."""
    try:
        argv = shlex.split(command.text)
    except ValueError as err:
        raise AssertionError(f"{command}\n  the shell cannot parse it: {err}") from None
    program, args = split_program(argv)
    if program in ("train/pretrain.py", "train/analyze.py"):
        check_hydra_command(command, program, args)
    elif program.startswith(("scripts/", "benchmarks/")) and program.endswith(".py"):
        check_script(command, program, args)
    else:
        raise AssertionError(
            f"{command}\n  no rule checks this command: teach tests/test_docs.py to run it, or add a SKIP rule "
            "with the reason it cannot run here"
        )


def check_hydra_command(command: Command, program: str, args: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from vitreg.config import ConfigError, register_configs, validate_analyze_config, validate_config
    from vitreg.runtime.run_dir import register_resolvers

    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif arg not in HYDRA_FLAGS and arg != "..." and not arg.startswith("--cfg="):
            overrides.append(arg)
    analyze = program == "train/analyze.py"
    if analyze:  # what train/analyze.py does to sys.argv before Hydra sees it
        overrides = analyze_module().quote_path_overrides(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise AssertionError(f"{command}\n  Hydra refuses the overrides the shell passes {overrides}: {err}") from None
    register_configs()
    register_resolvers()
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [arg]
        for o, arg in zip(parsed, overrides, strict=True)
    ]
    readers_paths = {a.partition("=")[2].strip("'\"") for a in overrides} | set(args)
    for combination in itertools.islice(itertools.product(*choices), MAX_SWEEP_COMBINATIONS):
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(
                    config_name="analyze" if analyze else "pretrain",
                    overrides=list(combination),
                    return_hydra_config=any(o.startswith(("hydra/", "hydra.")) for o in combination),
                )
                with open_dict(cfg):
                    cfg.pop("hydra", None)  # composed to check the launcher's overrides; vitreg validates the rest
            with readers_files_exist(readers_paths):
                (validate_analyze_config if analyze else validate_config)(cfg)
        except (HydraException, OmegaConfBaseException, ConfigError) as err:
            raise AssertionError(f"{command}\n  with {list(combination)}: {type(err).__name__}: {err}") from None


@contextlib.contextmanager
def readers_files_exist(paths: set[str]):
    """Paths the command names (a checkpoint, /data/photos) count as existing during validation."""
    exists, isfile, isdir = os.path.exists, os.path.isfile, os.path.isdir
    with (
        mock.patch("os.path.exists", lambda p: str(p) in paths or exists(p)),
        mock.patch("os.path.isfile", lambda p: str(p) in paths or isfile(p)),
        mock.patch("os.path.isdir", lambda p: str(p) in paths or isdir(p)),
    ):
        yield


def analyze_module():
    if "vitreg_docs_analyze" not in sys.modules:
        sys.modules["vitreg_docs_analyze"] = type(sys)("vitreg_docs_analyze")
        namespace = runpy.run_path(str(ROOT / "train" / "analyze.py"), run_name="vitreg_docs_analyze")
        sys.modules["vitreg_docs_analyze"].__dict__.update(namespace)
    return sys.modules["vitreg_docs_analyze"]


def check_script(command: Command, program: str, args: list[str]) -> None:
    path = ROOT / program
    if not path.is_file():
        raise AssertionError(f"{command}\n  no script at {program}")
    if "argparse" not in path.read_text():
        raise AssertionError(f"{command}\n  {program} does not use argparse: its arguments cannot be checked")
    parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []

    def stop_after_parse_args(self, *a, **k):
        inside.append(True)
        try:
            parse_args(self, *a, **k)
        finally:
            inside.pop()
        raise ArgumentsParsed

    def stop_after_parse_known_args(self, *a, **k):
        result = parse_known_args(self, *a, **k)
        if inside:
            return result  # parse_args goes on to refuse unknown arguments
        raise ArgumentsParsed

    stderr = io.StringIO()
    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", stop_after_parse_args),
        mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop_after_parse_known_args),
        mock.patch.object(sys, "argv", [str(path), *args]),
        mock.patch.object(sys, "path", [str(path.parent), *sys.path]),
        contextlib.redirect_stderr(stderr),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except ArgumentsParsed:
            return
        except SystemExit as err:
            raise AssertionError(f"{command}\n  {program} exits ({err.code}): {stderr.getvalue().strip()}") from None
    raise AssertionError(f"{command}\n  {program} finished without parsing arguments with argparse")


# ----------------------------------------------------------------------------------------------- tests
COMMANDS = documented_commands()


def test_the_documents_have_commands():
    assert len(COMMANDS) > 40 and {c.file for c in COMMANDS} >= {"README.md", "docs/data.md", "docs/telemetry.md"}


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.file}:{c.line}" for c in COMMANDS])
def test_documented_command_works(command):
    reason = skip_reason(command)
    if reason:
        pytest.skip(f"not run here: {reason}")
    check(command)


BRACES_UNQUOTED = """
```bash
python train/pretrain.py experiment=dinov2_vitl14_reg4 data=webdataset \\
    data.webdataset.shards='/data/shards/in1k/train-{000000..001281}.tar'
python train/pretrain.py experiment=dinov2_vitl14_reg4 data=webdataset \\
    "data.webdataset.shards='/data/shards/in1k/train-{000000..001281}.tar'"
```
"""


def test_the_check_catches_a_brace_pattern_the_shell_unquotes():
    """docs/data.md once gave the first form: the shell strips the single quotes, Hydra refuses `{`."""
    wrong, right = shell_commands(BRACES_UNQUOTED, "docs/data.md")
    with pytest.raises(AssertionError, match=r"(?s)docs/data\.md:3: .*Hydra refuses the overrides"):
        check(wrong)
    check(right)


def test_reading_joins_lines_sets_variables_and_checks_scripts_and_wrong_keys():
    doc = """
```bash
C=outputs/demo/checkpoints/last.ckpt      # a comment
python train/analyze.py task=knn checkpoint=$C data.train=shards/x   # trailing comment
sbatch --nodes=4 slurm/pretrain.sbatch model=vitl registers=4
python scripts/plot_sweep.py a b --out o --no-such-flag
python train/pretrain.py model=vitl callbacks.telemetry.media_style=fast
frobnicate --now
```
```python
not_a_shell_command()
```
"""
    analyze, sbatch, script, wrong_value, unknown = shell_commands(doc, "x.md")
    assert (analyze.line, analyze.text) == (
        4,
        "python train/analyze.py task=knn checkpoint=outputs/demo/checkpoints/last.ckpt data.train=shards/x",
    )
    check(analyze)
    check(sbatch)
    with pytest.raises(AssertionError, match=r"(?s)x\.md:6: .*unrecognized arguments: --no-such-flag"):
        check(script)
    with pytest.raises(AssertionError, match=r"(?s)x\.md:7: .*callbacks\.telemetry\.media_style: must be one of"):
        check(wrong_value)
    with pytest.raises(AssertionError, match=r"x\.md:8: frobnicate --now\n  no rule checks this command"):
        check(unknown)


def test_the_demo_cadence_is_stated_as_configured():
    """Each "every N steps ... in the demo" / "N in the demo" in the documents is conf/experiment/demo.yaml's."""
    import yaml

    every = yaml.safe_load((ROOT / "conf/experiment/demo.yaml").read_text())["callbacks"]["telemetry"]["every_n_steps"]
    pattern = re.compile(
        r"every (\d+) steps in the demo|(\d+) in the demo\)|demo measures every (\d+)|"
        r"measures the artifact telemetry every (\d+) steps"
    )
    stated = []
    for path in sorted({p for pattern_ in DOCUMENTS for p in ROOT.glob(pattern_)}):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                value = next(int(g) for g in match.groups() if g)
                stated.append((f"{path.relative_to(ROOT)}:{number}", value))
    assert len(stated) >= 3, stated
    assert [s for s in stated if s[1] != every] == [], f"the demo measures every {every} steps"


def python_blocks() -> list[tuple[str, int, str]]:
    """(file, first line, code) of every fenced ``python`` block of the documents."""
    blocks = []
    for path in sorted({p for pattern in DOCUMENTS for p in ROOT.glob(pattern)}):
        lines, start = path.read_text().splitlines(), None
        for number, line in enumerate(lines, 1):
            if start is None and re.match(r"^\s*```python\s*$", line):
                start = number
            elif start is not None and re.match(r"^\s*```\s*$", line):
                blocks.append((str(path.relative_to(ROOT)), start + 1, "\n".join(lines[start : number - 1])))
                start = None
    return blocks


def test_python_examples_parse_and_import_what_vitreg_has():
    """The Python examples are not run (they need checkpoints and runs), but they must be valid Python
    and every name they import from vitreg must exist (renamed APIs break them silently otherwise)."""
    import ast
    import importlib
    import textwrap

    blocks = python_blocks()
    assert len(blocks) >= 4
    problems = []
    for file, line, code in blocks:
        try:
            tree = ast.parse(textwrap.dedent(code))
        except SyntaxError as err:
            problems.append(f"{file}:{line + (err.lineno or 1) - 1}: not valid Python: {err.msg}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vitreg":
                where = f"{file}:{line + node.lineno - 1}"
                try:
                    module = importlib.import_module(node.module)
                except ImportError as err:
                    problems.append(f"{where}: from {node.module} import ...: {err}")
                    continue
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                if missing:
                    problems.append(f"{where}: {node.module} has no {', '.join(missing)}")
    assert problems == []
