"""The README works as written, read from the top (issue 17, item 11):
  - each `lottery` command of its code blocks and inline code passes the command line's
    pre-check (every override parsed, composed and validated: what a run checks before it
    trains), and `lottery-bench`'s options parse;
  - each folder that a `lottery report` command or a Python block reads is one that a command
    earlier in the README writes (a run writes `outputs/<name>/<run id>`, a sweep
    `multirun/<name>/<run id>`), and they run on such a tree, made of the tests' tiny run;
  - each file path it names exists in the repository and each `lottery.*` name imports.
Placeholders (`<overrides>`, `DIR`, `...`) are not commands and are skipped."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

from lottery import cli
from lottery.analysis import report
from lottery.identity import run_id
from lottery.llm import cli as llm_cli
from lottery.lm import cli as lm_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|…|\bDIR\b|\bPATH\b|\bKEY\b|=N\b|=P\b|=L\b")
TOP = ("lottery/", "conf/", "experiments/", "docs/", "notebooks/", "tests/", ".ci/")


def items() -> list[tuple[str, str]]:
    """The README's code in reading order: ("bash" | "python", block) for fenced blocks and
    ("inline", span) for inline code."""
    found, at = [], 0
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.M | re.S):
        found += [("inline", span) for span in re.findall(r"`([^`\n]+)`", README[at:block.start()])]
        found.append((block.group(1), block.group(2)))
        at = block.end()
    return found + [("inline", span) for span in re.findall(r"`([^`\n]+)`", README[at:])]


def commands(kind: str, code: str) -> list[list[str]]:
    """The command lines of a bash block (continuations joined, comments dropped, `&&`
    chains split) or of an inline span that is a whole `lottery` command."""
    if kind == "inline":
        lines = [code] if re.match(r"lottery(-bench)?( |$)", code) else []
    elif kind == "bash":
        lines = code.replace("\\\n", " ").splitlines()
    else:
        return []
    out = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if (words and words[0] in ("lottery", "lottery-bench") and not PLACEHOLDER.search(part)
                    and words not in (["lottery"], ["lottery", "report"], ["lottery", "lm"],
                                      ["lottery", "llm"])):
                out.append(words)
    return out


def written(args: list[str]) -> list[str]:
    """The folders an IMP command writes: `outputs/<name>/<id>`, or a sweep's
    `multirun/<name>/<id>` for each job (the ids of the first values; enough for a path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in args if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(plain)
    first = [o.input_line if not o.is_sweep_override() else
             f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in parsed]
    with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=first)
    top = "multirun" if "-m" in args else "outputs"
    return [f"{top}/{cfg.name}", f"{top}/{cfg.name}/{run_id(cfg)}"]


def walk():
    """(kind, code, command, folders written so far) for every command and Python block."""
    folders = set()
    for kind, code in items():
        if kind == "python":
            yield kind, code, None, set(folders)
        for words in commands(kind, code):
            yield kind, code, words, set(folders)
            args = words[1:]
            if words[0] == "lottery" and args[:1] not in (["report"], ["lm"], ["llm"],
                                                          ["check"]):
                folders.update(written(args))


STEPS = list(walk())


def test_the_readme_has_commands_of_each_kind():
    firsts = {tuple(words[:2]) for _, _, words, _ in STEPS if words}
    assert {("lottery", "report"), ("lottery", "lm"), ("lottery", "llm"),
            ("lottery", "experiment=lenet_mnist"), ("lottery", "-m")} <= firsts
    assert any(kind == "python" for kind, *_ in STEPS)


COMMANDS = [words for _, _, words, _ in STEPS if words and words[:2] != ["lottery", "report"]]


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words)[:80])
def test_each_command_passes_its_checks(words, capsys):
    """The pre-check of `lottery` / `lottery lm` / `lottery llm` accepts it (it exits 2 on
    anything bad)."""
    if words[0] == "lottery-bench":
        from lottery.bench import main

        with pytest.raises(SystemExit) as stop:
            main([*words[1:], "--help"])  # parses the options, runs nothing
        assert stop.value.code == 0
    elif words[1] in ("lm", "llm"):
        app, root = (lm_cli, lm_cli.LMConfig) if words[1] == "lm" else (llm_cli,
                                                                       llm_cli.LLMConfig)
        app.overrides.check_overrides(words[2:], app.CONF_DIR, app.CONFIG_NAME, app.validate,
                                      root, app.PROGRAM)
    else:
        cli.check_overrides([w for w in words[1:] if w != "check"])
    assert "error" not in capsys.readouterr().err


def test_the_main_jobs_run_id_in_the_readme_is_the_real_one():
    """The README names the main job's folder (its first code block's run) by its real id."""
    main = next(words for kind, _, words, _ in STEPS if kind == "bash" and words[0] == "lottery")
    folder = written(main[1:])[1]
    assert folder in README


@pytest.fixture(scope="module")
def tree(main_run, tmp_path_factory):
    """A working folder holding the tiny run at every folder the README's commands write."""
    root = tmp_path_factory.mktemp("readme")
    for folder in {f for _, _, _, folders in STEPS for f in folders}:
        target = root / folder
        if len(Path(folder).parts) == 2:  # outputs/<name>, multirun/<name>: a run inside
            target = target / "0123456789"
        if not target.exists():
            shutil.copytree(main_run.dir, target)
    return root


REPORTS = [(words, folders) for _, _, words, folders in STEPS
           if words and words[:2] == ["lottery", "report"]]


@pytest.mark.parametrize("words, folders", REPORTS, ids=[" ".join(w) for w, _ in REPORTS])
def test_each_report_reads_a_folder_an_earlier_command_wrote(words, folders, tree, monkeypatch):
    path = words[2]
    assert path.rstrip("/") in folders, f"{path}: no earlier command of the README writes it"
    monkeypatch.chdir(tree)
    out = tree / "report" / path
    assert report.main([*words[2:], "--out", str(out)]) == 0
    assert (out / "report.md").exists()


PYTHON = [(code, folders) for kind, code, _, folders in STEPS if kind == "python"]


@pytest.mark.parametrize("code, folders", PYTHON, ids=[str(i) for i in range(len(PYTHON))])
def test_each_python_block_runs_on_the_folders_written_before_it(code, folders, tree,
                                                                   monkeypatch):
    for path in re.findall(r"""["']((?:outputs|multirun)/[^"']*)["']""", code):
        assert path.rstrip("/") in folders, f"{path}: no earlier command of the README writes it"
    monkeypatch.chdir(tree)
    exec(compile(code, "README.md", "exec"), {})


def test_each_named_file_and_module_exists():
    spans = set(re.findall(r"`([^`\n]+)`", README))
    paths = {s.rstrip("/") for s in spans if s.startswith(TOP) and not PLACEHOLDER.search(s)}
    missing = sorted(p for p in paths if not any(ROOT.glob(p)))
    assert not missing, missing
    names = {m.group(1) for s in spans if (m := re.fullmatch(r"(lottery(?:\.\w+)+)(\(.*\))?", s))}
    assert names
    for name in sorted(names):
        module, attrs = name, []
        while True:
            try:
                obj = __import__(module, fromlist=["_"])
                break
            except ModuleNotFoundError:
                module, attr = module.rsplit(".", 1)
                attrs.insert(0, attr)
        for attr in attrs:
            obj = getattr(obj, attr)  # AttributeError names what the README gets wrong


def test_the_opening_says_what_a_user_gets_and_speed_holds_the_measurements():
    """Item 14: the README opens with what a user gets, in plain words, before any of the
    engine's internals; measured speeds (replica-steps/s, GFLOP/s, "× faster") appear only in
    its Speed section."""
    opening, *sections = README.split("\n## ")
    assert "What you get" in opening
    assert not re.search(r"vmap|lax\.|XLA|jit|Eigen|kernel", opening), opening
    measured = re.compile(r"replica-steps/s|GFLOP/s|\d× faster|\d–\d[\d.]*× ")
    outside = [s.splitlines()[0] for s in sections
               if not s.startswith("Speed") and measured.search(s)]
    assert not outside, outside
    assert measured.search(next(s for s in sections if s.startswith("Speed")))
